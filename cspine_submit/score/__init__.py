"""Scoring: crops from the planned slices, the classifier architectures, devices, loading, prediction, pooling.

The stage's face. TensorFlow/Keras are imported only inside the functions that need them, so importing this
package stays cheap (the CLI's argument checks run before TensorFlow loads).
"""

from cspine_submit.score.aggregate import aggregate_study, effective_top_k, pool_slices, prior_probabilities
from cspine_submit.score.crop import encode_crops, prepare_crops, prepare_encoded_crops, slices_needed
from cspine_submit.score.models import build_classifier, load_classifiers, plan_devices, predict, score

__all__ = [
    "aggregate_study", "effective_top_k", "pool_slices", "prior_probabilities", "encode_crops", "prepare_crops",
    "prepare_encoded_crops", "slices_needed", "build_classifier", "load_classifiers", "plan_devices", "predict",
    "score",
]
