"""The per-vertebra classifiers' old home, kept as a thin re-export for callers (issue 17 split it in four rooms).

:mod:`~cspine_submit.score.architectures` (the table and the factory), :mod:`~cspine_submit.score.devices`
(devices, precision, the placement), :mod:`~cspine_submit.score.loading` (every file format, saving),
:mod:`~cspine_submit.score.prediction` (compiled batched scoring). New code imports from those or from
``cspine_submit.score``. A name patched here is not seen by the functions that use it: patch it in the module
that looks it up (``loading.load_classifier``, ``prediction.score`` where callers import it from there).
"""

from cspine_submit.score.architectures import ARCHITECTURES, Architecture, build_classifier
from cspine_submit.score.devices import (
    DevicePlan, distribution_strategy, dtype_policy, fast_float16_available, gpu_devices, no_gpu_reasons, plan_devices,
    precision_policy,
)
from cspine_submit.score.loading import (
    NOTEBOOK_CONFIG, NOTEBOOK_FILES, DefaultConfigWarning, average_classifiers, classifier_groups, inspect_model_file,
    is_default_config, load_classifier, load_classifiers, notebook_config, read_h5_layer_weights, read_weights_config,
    save_classifier, set_weights_by_layer,
)
from cspine_submit.score.prediction import predict, score

__all__ = [
    "ARCHITECTURES", "Architecture", "build_classifier", "DevicePlan", "distribution_strategy", "dtype_policy",
    "fast_float16_available", "gpu_devices", "no_gpu_reasons", "plan_devices", "precision_policy", "NOTEBOOK_CONFIG",
    "NOTEBOOK_FILES", "DefaultConfigWarning", "average_classifiers", "classifier_groups", "inspect_model_file",
    "is_default_config", "load_classifier", "load_classifiers", "notebook_config", "read_h5_layer_weights",
    "read_weights_config", "save_classifier", "set_weights_by_layer", "predict", "score",
]
