"""A submission run: the run's steps in order, the worker's study preparation, the report and submission.csv.

The stage's face: :func:`run_submission` is what ``cspine-submit submit`` calls.
"""

from cspine_submit.submit.run import RunResult, StudyJob, prepare_run, prepare_study, run_submission
from cspine_submit.submit.submission import read_test_csv, row_id, write_submission

__all__ = ["RunResult", "StudyJob", "prepare_run", "prepare_study", "run_submission", "read_test_csv", "row_id",
           "write_submission"]
