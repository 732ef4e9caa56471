"""Training the classifiers: the run, its data and cache, ``--plan``, calibration, the competition metric.

The stage's face (it is also what the old module ``cspine_submit.train`` offered). TensorFlow is imported only
inside the functions that train.
"""

from cspine_submit.train.metric import competition_score, evaluate_files
from cspine_submit.train.plan import format_plan, plan_training
from cspine_submit.train.fit import train_unit
from cspine_submit.train.options import TrainOptions, TrainResult
from cspine_submit.train.run import existing_outputs, train_classifiers

__all__ = ["competition_score", "evaluate_files", "format_plan", "plan_training", "TrainOptions", "TrainResult",
           "existing_outputs", "train_classifiers", "train_unit"]
