"""A submission run: the worker's study preparation, the set-up, the run's steps in order, the report, submission.csv.

The stage's face. Rooms in data-flow order: :mod:`~cspine_submit.submit.setup` (:func:`prepare_run`: rows,
classifiers, ranges) -> :mod:`~cspine_submit.submit.worker` (:func:`prepare_study`, in worker processes) ->
:mod:`~cspine_submit.submit.run` (:func:`run_submission`, what ``cspine-submit submit`` calls; the time budget in
:mod:`~cspine_submit.submit.budget`) -> :mod:`~cspine_submit.submit.run_report` (totals, :func:`run_problems`) and
:mod:`~cspine_submit.submit.submission` (the CSV, journal and report files; :mod:`~cspine_submit.submit.plan_report`
says where each vertebra was looked for).
"""

from cspine_submit.submit.budget import BudgetController
from cspine_submit.submit.run import RunResult, run_submission
from cspine_submit.submit.run_report import fell_back, run_problems
from cspine_submit.submit.setup import RunSetup, initial_priors, load_models, load_ranges_for, prepare_run
from cspine_submit.submit.submission import plan_rows, read_test_csv, row_id, write_submission
from cspine_submit.submit.worker import PreparedStudy, StudyFailure, StudyJob, prepare_study

__all__ = [
    "BudgetController", "RunResult", "run_submission", "fell_back", "run_problems", "RunSetup", "initial_priors",
    "load_models", "load_ranges_for", "prepare_run", "plan_rows", "read_test_csv", "row_id", "write_submission",
    "PreparedStudy", "StudyFailure", "StudyJob", "prepare_study",
]
