"""Scoring: crops from the planned slices, the classifier architectures, devices, loading, prediction, pooling.

The stage's face. TensorFlow/Keras are imported only inside the functions that need them, so importing this
package stays cheap (the CLI's argument checks run before TensorFlow loads).
"""

from cspine_submit.score.aggregate import aggregate_study, effective_top_k, pool_slices, prior_probabilities
from cspine_submit.score.architectures import ARCHITECTURES, build_classifier
from cspine_submit.score.crop import encode_crops, prepare_crops, prepare_encoded_crops, slices_needed
from cspine_submit.score.devices import DevicePlan, distribution_strategy, dtype_policy, gpu_devices, plan_devices, precision_policy
from cspine_submit.score.memory import (
    DeviceOutOfMemoryError, MemoryPlan, MemoryPlanError, kaggle_plans, plan_for_devices, plan_memory, require_fit,
)
from cspine_submit.score.loading import DefaultConfigWarning, is_default_config, load_classifiers, save_classifier
from cspine_submit.score.prediction import predict, score

__all__ = [
    "aggregate_study", "effective_top_k", "pool_slices", "prior_probabilities", "ARCHITECTURES", "build_classifier",
    "encode_crops", "prepare_crops", "prepare_encoded_crops", "slices_needed", "DevicePlan", "distribution_strategy",
    "dtype_policy", "gpu_devices", "plan_devices", "precision_policy", "DefaultConfigWarning", "is_default_config",
    "load_classifiers", "save_classifier", "predict", "score", "DeviceOutOfMemoryError", "MemoryPlan", "MemoryPlanError",
    "kaggle_plans", "plan_for_devices", "plan_memory", "require_fit",
]
