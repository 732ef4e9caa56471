"""The streaming submission flow: test folder -> submission.csv, never crashing on a bad study.

Per study, in worker processes (:func:`cspine_submit.submit.worker.prepare_study`, run through
:func:`cspine_submit.read.iter_studies`): scan headers -> plan crops (and say where,
:mod:`cspine_submit.submit.plan_report`) -> decode only the planned slices -> prepare model crops, sent back as
uint16. Before the run, :func:`cspine_submit.submit.setup.prepare_run` loads what it needs. In the main process,
:func:`run_submission` reads as the run's steps, which follow in this module in order:

1. :func:`start_run` - open the journal, take the studies a killed run finished, set up budget and scorer;
2. :func:`write_priors_file` - a complete submission.csv at once (priors for every study not done);
3. :func:`warm_up` - trace the scoring graphs before the clock starts;
4. :func:`stream_studies` - while the workers prepare the next studies, score each one (:func:`score_study`, guarded
   against hangs by :class:`GuardedScorer`), pool to 8 probabilities, journal it, refresh submission.csv;
5. :func:`finish_run` - the final submission.csv and the run report (:mod:`cspine_submit.submit.run_report`).

A study that fails at any step gets its 8 rows from the priors, and the report says which step failed and why.
The time budget (:class:`cspine_submit.submit.budget.BudgetController`) lowers the slices per vertebra for the
remaining studies when the running projection overshoots, and falls back to priors only when the budget is spent.

This module is importable without TensorFlow (the CLI checks its arguments first); scoring loads it.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.read import iter_studies
from cspine_submit.score import aggregate, encode_crops
from cspine_submit.score import prediction  # prediction.score looked up at each call: tests replace it
from cspine_submit.submit import submission
from cspine_submit.submit.budget import BudgetController
from cspine_submit.submit.run_report import (
    all_priors_reason,
    fallback_entry,
    fell_back,
    report_totals,
    run_problems,
)
from cspine_submit.submit.setup import RunSetup, initial_priors, load_models, load_ranges_for, prepare_run
from cspine_submit.submit.worker import (
    MIN_SLICES,
    PreparedStudy,
    StudyFailure,
    StudyJob,
    failure_reason,
    prepare_or_skip,
    prepare_study,
)

# The names above that this module does not use itself were the flat layout's ``pipeline`` API (``pipeline`` is
# this module under its old name, :mod:`cspine_submit._moved`); kept importable from here for one release.
__all__ = [
    "REFRESH_SECONDS", "RunResult", "RunState", "GuardedScorer", "ScoringTimeout", "start_run", "write_priors_file",
    "warm_up", "score_study", "stream_studies", "finish_run", "run_submission", "priors_only_run", "Interrupted",
    "note_interrupt",
    # moved (import them from their rooms or the stage's face):
    "BudgetController", "RunSetup", "prepare_run", "initial_priors", "load_models", "load_ranges_for", "MIN_SLICES",
    "PreparedStudy", "StudyFailure", "StudyJob", "prepare_study", "fell_back", "run_problems",
]

REFRESH_SECONDS = 30.0
"""Default seconds between two refreshes of submission.csv during a run (measured cost: see the issue 11 note)."""


CLOSE_WAIT_S = 30.0
"""Seconds an interrupted run waits for the scoring call in flight before it exits (one study's scoring)."""


# ---------------------------------------------------------------------------------------------------------------
# What a run holds


@dataclass
class RunResult:
    """What :func:`run_submission` did."""

    out: Path
    report_path: Path
    probabilities: dict  # {row_id: p}
    studies: dict  # the report's per-study entries
    totals: dict


class Interrupted(KeyboardInterrupt):
    """A signal other than SIGINT (the CLI routes SIGTERM here) ending a run the way Ctrl-C does.

    A KeyboardInterrupt, so that every step that lets Ctrl-C through lets it through too; ``signum`` gives the
    exit code (128 + signum, as a shell reports a process the signal killed).
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class ScoringTimeout(RuntimeError):
    """Scoring one study took longer than allowed; the study falls back, the run goes on."""


class GuardedScorer:
    """Scores studies in a helper thread, so that a hang inside TensorFlow costs one study, not the run.

    A call that does not return within ``timeout`` seconds raises :class:`ScoringTimeout`; its thread is abandoned
    (a thread stuck in native code cannot be stopped). It is a daemon thread, so it does not keep the process from
    exiting once the run is done (a ``ThreadPoolExecutor`` worker would: they are joined at exit). After
    ``max_timeouts`` timeouts in a row the device is taken for wedged and every later call fails at once, so that the
    remaining studies get their priors quickly instead of waiting ``timeout`` each.

    Parameters
    ----------
    score_fn : callable
        ``score_fn(crops_by_vertebra) -> {vertebra: probabilities}``.
    timeout : float or None
        Seconds; None scores in the calling thread, unguarded.
    """

    def __init__(self, score_fn: Callable[[dict], dict], timeout: float | None, max_timeouts: int = 2):
        self.score_fn = score_fn
        self.timeout = None if timeout is None or timeout <= 0 else float(timeout)
        self.max_timeouts = int(max_timeouts)
        self.timeouts = 0
        self._in_a_row = 0
        self._current: tuple[threading.Thread, threading.Event] | None = None  # the call in flight, if any

    def __call__(self, crops: dict) -> dict:
        if self.timeout is None:
            return self.score_fn(crops)
        if self._in_a_row >= self.max_timeouts:
            raise ScoringTimeout(f"scoring hung {self._in_a_row} times in a row; not tried again in this run")
        box: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                box["value"] = self.score_fn(crops)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                box["error"] = exc
            finally:
                done.set()

        thread = threading.Thread(target=work, name="scorer", daemon=True)
        self._current = (thread, done)
        thread.start()
        if not done.wait(self.timeout):
            self.timeouts += 1
            self._in_a_row += 1
            self._current = None  # abandoned: it hangs, waiting for it would hang the exit too
            raise ScoringTimeout(f"scoring did not finish within {self.timeout:.0f} s")
        self._in_a_row = 0
        self._current = None
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Let a call still in flight (the run was interrupted while it scored) finish, for at most ``wait_s``.

        A daemon thread still inside TensorFlow's C++ code when the interpreter exits is ended there, which aborts
        the process ("terminate called ... exception not rethrown") instead of exiting with the run's code. A
        call abandoned for a timeout is not waited for: it hangs.
        """
        current, self._current = self._current, None
        if current is not None:
            current[1].wait(wait_s)


@dataclass
class RunState:
    """One run in progress: what is done, what is left, and the files that record it.

    Built by :func:`start_run`; the steps of :func:`run_submission` read and update it.
    """

    setup: RunSetup
    out: Path
    report_path: Path
    priors: dict
    journal: Any  # submission.Journal
    live: Any  # submission.LiveSubmission
    budget: BudgetController
    todo: list  # uids to prepare and score, in order
    todo_missing: list  # uids whose folder does not exist
    study_probs: dict = field(default_factory=dict)
    studies: dict = field(default_factory=dict)
    n_resumed: int = 0
    journal_notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    time_budget: float | None = None
    on_study: Callable[[str, dict], None] | None = None
    t_start: float = 0.0
    t_loop: float = 0.0
    warmup_seconds: float = 0.0
    configs: dict = field(default_factory=dict)  # {K: ModelConfig}
    scorer: Any = None
    interrupted: dict | None = None  # {"signal", "exit_code", "done", "of"} after Ctrl-C or SIGTERM

    def finish(self, uid: str, probs: dict, entry: dict, journaled: bool = True) -> None:
        """Record one study: report entry, journal (unless it must be redone by --resume), live submission."""
        self.study_probs[uid] = probs
        self.studies[uid] = entry
        if journaled:
            self.journal.append(uid, probs, entry)
        self.live.set_study(uid, probs)
        self.live.refresh_if_due()
        if self.on_study is not None:
            self.on_study(uid, entry)

    def job_config(self) -> ModelConfig:
        """The config for the next job: the run's, with the K in force now."""
        k = self.budget.k
        if k not in self.configs:
            self.configs[k] = self.setup.config.replace(slices_per_vertebra=k)
        return self.configs[k]

    def jobs(self) -> Iterator[StudyJob]:
        """The studies to prepare; a generator, so each job takes the K in force when the reader pulls it."""
        vertebrae = tuple(v for v in VERTEBRAE if v in self.setup.models)
        for uid in self.todo:
            if self.budget.exhausted:
                yield StudyJob(uid, "", self.setup.ranges, self.setup.config, ())  # not prepared: see _handle_outcome
            else:
                yield StudyJob(uid, str(self.setup.plan.folders[uid]), self.setup.ranges, self.job_config(), vertebrae)


def _iter_outcomes(items: Iterable, work_fn: Callable, workers: int, timeout: float | None = None) -> Iterator:
    """Outcomes of ``work_fn`` per item from :func:`reader.iter_studies` (``workers=0``: in this process), so that
    run reports read the same whatever the worker count."""
    workers = max(0, int(workers))
    return iter_studies(items, work_fn, workers=workers, prefetch=max(2, 2 * workers), timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# The run's steps, in order


def start_run(setup: RunSetup, out: str | Path, *, resume: bool = False, report_path: str | Path | None = None,
              time_budget: float | None = None, refresh_seconds: float = REFRESH_SECONDS,
              on_study: Callable[[str, dict], None] | None = None, study_timeout: float | None = None) -> RunState:
    """Step 1, prepare: open the journal (taking the studies a killed run finished when resuming), split the studies
    into those to do and those whose folder is missing, set up the time budget, the live submission and the scorer."""
    t_start = time.perf_counter()
    out = Path(out)
    journal_path, default_report = submission.companion_paths(out)
    priors = aggregate.prior_probabilities(setup.config)
    journal = submission.Journal(journal_path, setup.fingerprint)
    done_records, journal_notes = journal.load() if resume else ({}, [])
    journal.start(keep=resume)
    live = submission.LiveSubmission(out, setup.plan.row_ids, priors, every_s=refresh_seconds)
    state = RunState(setup=setup, out=out, report_path=Path(report_path) if report_path else default_report,
                     priors=priors, journal=journal, live=live, budget=None, todo=[], todo_missing=[],
                     journal_notes=list(journal_notes), time_budget=time_budget, on_study=on_study, t_start=t_start)
    for uid, rec in done_records.items():
        if uid in setup.plan.folders:
            state.study_probs[uid] = rec["probs"]
            state.studies[uid] = dict(rec["report"], resumed=True)
            live.set_study(uid, rec["probs"])
    state.n_resumed = len(state.studies)
    for uid in setup.plan.studies:
        if uid not in state.study_probs:
            (state.todo if Path(setup.plan.folders[uid]).is_dir() else state.todo_missing).append(uid)
    state.budget = BudgetController(time_budget, len(state.todo), setup.config.slices_per_vertebra)
    state.configs = {setup.config.slices_per_vertebra: setup.config}
    state.scorer = GuardedScorer(lambda crops: prediction.score(setup.models, crops, setup.config.batch_size), study_timeout)
    return state


def write_priors_file(state: RunState) -> None:
    """Step 2: a complete submission.csv at once - priors for every study not done yet (resumed ones kept)."""
    for uid in state.todo_missing:
        state.finish(uid, state.priors, fallback_entry(f"study folder {state.setup.plan.folders[uid]} does not exist"))
    state.live.write()


def warm_up(state: RunState) -> None:
    """Step 3: trace the scoring graphs once before the clock of the first study starts.

    Otherwise the first study looks several times slower than the rest and the time-budget projection overreacts.
    A failure is a run warning (each study then falls back with its own scoring error), not a crash.
    """
    t = time.perf_counter()
    setup, config = state.setup, state.setup.config
    if state.todo and setup.models:
        shape = (config.slices_per_vertebra,) + tuple(config.input_shape)
        try:
            state.scorer({v: encode_crops(np.zeros(shape, np.float32)) for v in setup.models})
        except Exception as exc:  # noqa: BLE001
            state.warnings.append(f"the classifiers failed on a warm-up batch of shape {shape} "
                                  f"({type(exc).__name__}: {exc}); studies whose scoring fails get their priors")
    state.warmup_seconds = time.perf_counter() - t


def score_study(state: RunState, job: StudyJob, prepared: PreparedStudy, seconds: dict) -> None:
    """Score one prepared study in the main process, pool it to the 8 probabilities and record it."""
    config = state.setup.config
    seconds.update({k: round(v, 4) for k, v in prepared.seconds.items()})
    entry = {"status": "ok", "reason": None, "slices_read": prepared.slices_read, "seconds": seconds,
             "n_slices": prepared.n_slices, "slices_per_vertebra": job.config.slices_per_vertebra}
    if prepared.warnings:
        entry["warnings"] = list(prepared.warnings)
    if prepared.files_skipped:
        entry["files_skipped"] = prepared.files_skipped
    if prepared.slices_replaced:
        entry["slices_replaced"] = prepared.slices_replaced
    try:
        t = time.perf_counter()
        slice_probs = state.scorer(prepared.crops) if prepared.crops else {}
        seconds["score"] = round(time.perf_counter() - t, 4)
        t = time.perf_counter()
        probs, from_prior = aggregate.aggregate_study(slice_probs, config)
        seconds["aggregate"] = round(time.perf_counter() - t, 4)
    except Exception as exc:  # noqa: BLE001 - a scoring failure (or hang) costs this study only
        entry = fallback_entry(f"score: {type(exc).__name__}: {exc}", seconds, prepared.slices_read)
        entry["plan"] = prepared.plan
        state.finish(job.uid, state.priors, entry)
        return
    if from_prior:
        entry["priors_used"] = from_prior
    if set(VERTEBRAE) <= set(from_prior):
        # Not "ok": no classifier scored anything; its 8 rows are priors (the report and the totals say so).
        entry.update(status="fallback", reason=all_priors_reason(prepared.plan, job.vertebrae))
    entry["plan"] = prepared.plan
    state.finish(job.uid, probs, entry)


def _handle_outcome(state: RunState, outcome, t_prev: float) -> None:
    job: StudyJob = outcome.item
    seconds = {"wait": round(time.perf_counter() - t_prev, 4)}
    if outcome.error is None and outcome.value is not None:
        if getattr(outcome, "retried", None):  # its worker died once; the pydicom-route retry's result is scored
            outcome.value.warnings.append(f"worker: {outcome.retried}")
        score_study(state, job, outcome.value, seconds)
        return
    if job.folder == "":
        # Skipped for time: not finished, so not journaled - a --resume with time to spare must still do it.
        state.finish(job.uid, state.priors, fallback_entry("time budget spent before this study; priors used",
                                                            seconds), journaled=False)
    else:
        state.finish(job.uid, state.priors, fallback_entry(failure_reason(outcome.error), seconds))


def stream_studies(state: RunState, workers: int = 2, study_timeout: float | None = None,
                   progress: bool = True) -> None:
    """Step 4: workers prepare the studies ahead while this process scores them one by one; the live submission is
    refreshed as they finish; the time budget adjusts K. If the run itself fails (not one study), the studies not
    done get their priors, unjournaled, and a loud warning."""
    bar = tqdm(total=len(state.todo), unit="study", desc="studies", disable=not progress, dynamic_ncols=True)
    state.t_loop = time.perf_counter()
    t_prev, done = state.t_loop, 0
    outcomes = _iter_outcomes(state.jobs(), prepare_or_skip, workers, study_timeout)
    try:
        for outcome in outcomes:
            t_got = time.perf_counter()
            wait = t_got - t_prev
            _handle_outcome(state, outcome, t_prev)
            done += 1
            t_prev = time.perf_counter()
            elapsed = t_prev - state.t_start
            state.budget.update(t_prev - t_got + wait, elapsed, done, k=outcome.item.config.slices_per_vertebra)
            projected = state.budget.projected_total(elapsed, done)
            if projected is not None:
                finish_at = time.strftime("%H:%M:%S", time.localtime(time.time() + projected - elapsed))
                bar.set_postfix_str(f"K={state.budget.k} finish~{finish_at}", refresh=False)
            bar.update(1)
    except Exception as exc:  # noqa: BLE001 - e.g. the worker pool cannot start: still every row
        reason = f"run stopped before this study: {type(exc).__name__}: {exc}"
        state.warnings.append(f"THE RUN STOPPED EARLY ({type(exc).__name__}: {exc}); "
                              f"{sum(u not in state.studies for u in state.todo)} studies got their priors")
        for uid in state.todo:
            if uid not in state.studies:
                state.finish(uid, state.priors, fallback_entry(reason), journaled=False)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the CLI's handler (Interrupted)
        note_interrupt(state, exc)
    finally:
        bar.close()
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()  # stops the workers now (queued studies cancelled), not when the generator is collected
        state.journal.close()
        state.scorer.close()


def note_interrupt(state: RunState, exc: BaseException) -> None:
    """The run was interrupted: the studies not done keep the priors the live file already holds for them, and
    their report entries say so. Not journaled, so ``--resume`` does exactly them."""
    signum = int(getattr(exc, "signum", signal.SIGINT))
    name = signal.Signals(signum).name
    reason = f"run interrupted ({name}) before this study finished; --resume does it"
    left = [u for u in state.todo if u not in state.studies]
    for uid in left:
        # Straight into the report (no journal, no per-study refresh): the live file holds their priors already.
        state.study_probs[uid] = state.priors
        state.studies[uid] = fallback_entry(reason)
    n = len(state.setup.plan.studies)
    state.interrupted = {"signal": name, "exit_code": 128 + signum, "done": n - len(left), "of": n}


def finish_run(state: RunState) -> RunResult:
    """Step 5: the final submission.csv and the run report."""
    probabilities = state.live.write()
    wall = time.perf_counter() - state.t_start
    if state.scorer.timeouts:
        state.warnings.append(f"scoring hung {state.scorer.timeouts} time(s); those studies got their priors")
    totals = report_totals(state, wall)
    submission.write_report(state.report_path, state.studies, totals)
    return RunResult(out=state.out, report_path=state.report_path, probabilities=probabilities,
                     studies=state.studies, totals=totals)


def priors_only_run(setup: RunSetup, out: str | Path, reason: str, *, resume: bool = False,
                    report_path: str | Path | None = None) -> RunResult:
    """A run that reads no study: every row gets its prior and every study's report entry says ``reason``.

    For a run stopped before its studies (no classifier loaded): the submission is complete and the report
    counts what really happened (nothing scored), instead of there being no report at all. Nothing is journaled,
    so ``--resume`` with working weights does every study.
    """
    state = start_run(setup, out, resume=resume, report_path=report_path)
    write_priors_file(state)
    state.t_loop = time.perf_counter()
    for uid in state.todo:
        state.finish(uid, state.priors, fallback_entry(reason), journaled=False)
    state.journal.close()
    return finish_run(state)


def run_submission(
    setup: RunSetup,
    out: str | Path,
    *,
    workers: int = 2,
    time_budget: float | None = None,
    resume: bool = False,
    report_path: str | Path | None = None,
    progress: bool = True,
    on_study: Callable[[str, dict], None] | None = None,
    study_timeout: float | None = None,
    refresh_seconds: float = REFRESH_SECONDS,
) -> RunResult:
    """Process every study of ``setup.plan`` and write the submission and its report.

    Parameters
    ----------
    setup : RunSetup
        From :func:`prepare_run`.
    out : path of submission.csv (overwritten: the caller checks ``--force``)
    workers : worker processes preparing studies (0: in this process)
    time_budget : seconds for the whole run, or None
    resume : reuse the studies already in the journal next to ``out`` (same weights, config and test folder)
    report_path : where to write the run report (default: next to ``out``)
    progress : show a tqdm bar
    on_study : called as ``on_study(uid, report_entry)`` after each study is recorded
    study_timeout : seconds one study may spend in a worker, and in scoring in this process, before it is
        abandoned (falls back); the worker guard needs ``workers > 0``
    refresh_seconds : submission.csv is rewritten (atomically) at most this often while studies finish; it is
        complete (priors for the studies not done) from the start
    """
    state = start_run(setup, out, resume=resume, report_path=report_path, time_budget=time_budget,
                      refresh_seconds=refresh_seconds, on_study=on_study, study_timeout=study_timeout)
    write_priors_file(state)
    try:
        warm_up(state)
    except KeyboardInterrupt as exc:  # before the first study: nothing scored, the report still written
        note_interrupt(state, exc)
        state.journal.close()
    else:
        stream_studies(state, workers, study_timeout, progress)
    return finish_run(state)
