"""The streaming submission flow: test folder -> submission.csv, never crashing on a bad study.

Per study, in worker processes (:func:`prepare_study`, run through :func:`cspine_submit.read.reader.iter_studies`):
scan headers -> plan crops (and say where, :mod:`cspine_submit.submit.plan_report`) -> decode only the planned slices ->
prepare model crops, sent back as uint16. In the main process, :func:`run_submission` reads as the run's steps:

1. :func:`start_run` - open the journal, take the studies a killed run finished, set up budget and scorer;
2. :func:`write_priors_file` - a complete submission.csv at once (priors for every study not done);
3. :func:`warm_up` - trace the scoring graphs before the clock starts;
4. :func:`stream_studies` - while the workers prepare the next studies, score each one (:func:`score_study`, guarded
   against hangs by :class:`GuardedScorer`), pool to 8 probabilities, journal it, refresh submission.csv;
5. :func:`finish_run` - the final submission.csv and the run report.

A study that fails at any step gets its 8 rows from the priors, and the report says which step failed and why.
The time budget (:class:`BudgetController`) lowers the slices per vertebra for the remaining studies when the
running projection overshoots, and falls back to priors only when the budget is spent.

This module must stay importable without TensorFlow: worker processes import it to run :func:`prepare_study`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from cspine_submit.config import VERTEBRAE, ModelConfig, SliceRanges
from cspine_submit.files import default_weights_dir

MIN_SLICES = 3
"""Fewer slices than this cannot hold a cervical spine: such a study falls back to priors without planning."""

REFRESH_SECONDS = 30.0
"""Default seconds between two refreshes of submission.csv during a run (measured cost: see the issue 11 note)."""


# ---------------------------------------------------------------------------------------------------------------
# Worker side


@dataclass(frozen=True)
class StudyJob:
    """Everything a worker needs to prepare one study (picklable)."""

    uid: str
    folder: str
    ranges: SliceRanges
    config: ModelConfig
    vertebrae: tuple[str, ...]


@dataclass
class PreparedStudy:
    """A worker's result: model-ready crops of one study.

    Attributes
    ----------
    uid : str
    crops : dict
        ``{vertebra: (k, S, S, C) uint16}``, model input in the fixed-point code of
        :func:`cspine_submit.score.crop.encode_crops` (half the bytes of float32 to send between processes, 7.7e-6 off;
        the scoring side converts).
    slices_read : int
        Distinct slices decoded.
    n_slices : int
        Slices in the study.
    seconds : dict
        ``{stage: seconds}`` for scan, plan, read, crop.
    warnings : list of str
    plan : dict
        Where each vertebra was looked for (:func:`cspine_submit.submit.plan_report.plan_summary`).
    """

    uid: str
    crops: dict
    slices_read: int
    n_slices: int
    seconds: dict
    warnings: list = field(default_factory=list)
    plan: dict = field(default_factory=dict)


class StudyFailure(RuntimeError):
    """A study could not be prepared; the message starts with the failing stage."""


def prepare_study(job: StudyJob) -> PreparedStudy:
    """Scan, plan, read and crop one study (runs in a worker process).

    Raises
    ------
    StudyFailure
        Message ``"<stage>: <what went wrong>"``.
    """
    from cspine_submit import localize
    from cspine_submit.score import crop
    from cspine_submit.read import dicom
    from cspine_submit.submit import plan_report

    seconds: dict[str, float] = {}
    stage = "scan"
    t = time.perf_counter()
    try:
        header = dicom.scan_study(job.folder)
        seconds["scan"] = time.perf_counter() - t
        if header.n_slices < MIN_SLICES:
            raise ValueError(f"{job.folder}: only {header.n_slices} readable slice(s); a cervical spine needs more")
        warnings = [f"skipped {name}: {why}" for name, why in header.skipped]
        warnings += list(header.warnings)
        if header.study_uid != job.uid:
            warnings.append(f"folder {job.uid} holds StudyInstanceUID {header.study_uid}; rows use the folder name")
        stage, t = "plan", time.perf_counter()
        # Whole-number HU (all CT as scanners write it) are kept as int16: slices decode straight into the stack.
        hu_dtype = dicom.hu_dtype(header)
        cue_indices = np.zeros(0, dtype=np.int64)
        cue_slices = np.zeros((0, header.rows, header.cols), dtype=hu_dtype)
        cue = None
        if not job.vertebrae:
            planned = {}  # no classifier at all: nothing to plan (the study is still scanned, to report on it)
        elif job.ranges.method == "profile":
            # The profile planner needs a few decoded cue slices: decode them here, so that they count as slices
            # read and so that the crops below reuse those the plans also need instead of decoding them again.
            cue_indices = np.asarray(localize.study_cue_indices(header, job.ranges), dtype=np.int64)
            cue_slices = _read_reusing(header, cue_indices, cue_indices[:0], cue_slices, stack="cue", dtype=hu_dtype)
            cue = localize.measure_cue(header, job.ranges, slices=cue_slices)
            if cue.fallback:
                warnings.append(f"planner: {cue.fallback}")
            planned = localize.plan_crops(header, job.ranges, job.config, cue=cue)
        else:
            planned = localize.plan_crops(header, job.ranges, job.config)
        not_scored = {v: "no classifier loaded" for v in VERTEBRAE if v not in job.vertebrae}
        summary = plan_report.plan_summary(header, job.ranges, cue, planned, job.config, not_scored)
        if alignment_warning := plan_report.implausible_alignment(summary):
            warnings.append(f"planner: {alignment_warning}")
        skip = plan_report.priors_from_summary(summary)  # e.g. a vertebra planned outside the scan
        plans = {v: p for v, p in planned.items() if v not in skip}
        seconds["plan"] = time.perf_counter() - t
        stage, t = "read", time.perf_counter()
        needed = crop.slices_needed(plans, job.config, header.n_slices) if plans else np.zeros(0, dtype=np.int64)
        slices = _read_reusing(header, needed, cue_indices, cue_slices, stack="crops", dtype=hu_dtype)
        seconds["read"] = time.perf_counter() - t
        stage, t = "crop", time.perf_counter()
        crops = {v: crop.prepare_encoded_crops(slices, needed, plan, job.config) for v, plan in plans.items()}
        seconds["crop"] = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - any failure of one study becomes that study's fallback
        raise StudyFailure(f"{stage}: {type(exc).__name__}: {exc}") from None
    slices_read = int(np.union1d(needed, cue_indices).size)
    return PreparedStudy(job.uid, crops, slices_read, header.n_slices, seconds, warnings, plan=summary)


_STACKS: dict[str, np.ndarray] = {}


def _stack(name: str, shape: tuple[int, int, int], dtype=np.float32) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` kept by this (worker) process under ``name`` and reused by the next study.

    Fresh memory for every study's slice stack costs a page fault per 4 kB page on first write; measured on this
    project's VM that was about as much as decoding the slice with dicomsdl. A study's stacks live only while it is
    prepared (the crops are copies), so the next study can write over them.
    """
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape)) * dtype.itemsize
    buf = _STACKS.get(name)  # raw bytes, viewed as whichever dtype the study needs
    if buf is None or buf.size < n_bytes:
        buf = _STACKS[name] = np.empty(max(n_bytes, int(1.25 * (0 if buf is None else buf.size))), dtype=np.uint8)
    return buf[:n_bytes].view(dtype).reshape(shape)


def _read_reusing(header, indices: np.ndarray, known_indices: np.ndarray, known_slices: np.ndarray,
                  stack: str | None = None, dtype=np.float32) -> np.ndarray:
    """HU slices ``indices`` of a study, decoding only those not already in ``known_slices``.

    Parameters
    ----------
    header : StudyHeader
    indices : (m,) ndarray of int
        Slices wanted, head to feet indices.
    known_indices : (j,) ndarray of int
        Slices already decoded (e.g. the planner's cue slices), unique.
    known_slices : (j, rows, cols) ndarray
        Their HU, in ``known_indices`` order.
    stack : str, optional
        Write into this process's reusable stack of that name (:func:`_stack`; valid until the next study asks
        for it) instead of a new array.
    dtype : float32 or int16
        Of the result; int16 only when :func:`cspine_submit.read.dicom.hu_dtype` of the study says so.

    Returns
    -------
    (m, rows, cols) ndarray of ``dtype``
        HU in the order of ``indices``.
    """
    from cspine_submit.read import dicom

    indices = np.asarray(indices, dtype=np.int64)
    have = {int(i): r for r, i in enumerate(known_indices)}
    shape = (indices.size, header.rows, header.cols)
    out = _stack(stack, shape, dtype) if stack else np.empty(shape, dtype=dtype)
    first: dict[int, int] = {}
    for k, i in enumerate(indices.tolist()):
        if i in have:
            out[k] = known_slices[have[i]]
        elif i in first:
            out[k] = out[first[i]]
        else:
            # Straight into the stack: no temporary slice, each file opened once.
            dicom.decode_into(header, i, out[k])
            first[i] = k
    return out


def _failure_reason(error: str | None) -> str:
    """The report's reason for a study the workers could not prepare.

    A :class:`StudyFailure` already names its stage and cause (``"read: DicomReadError: <file>: ..."``); the
    reader's ``"StudyFailure: "`` prefix and its ``" (at pipeline.py:<line>)"`` suffix would only repeat where it was
    raised. Other errors (a worker that died, a timeout) are kept as the reader words them.
    """
    if not error:
        return "no result from the worker"
    prefix = f"{StudyFailure.__name__}: "
    if error.startswith(prefix):
        error = error[len(prefix):]
        at = error.rfind(" (at ")
        if at != -1 and error.endswith(")"):
            error = error[:at]
    return error


def _iter_outcomes(items: Iterable, work_fn: Callable, workers: int, timeout: float | None = None) -> Iterator:
    """Outcomes of ``work_fn`` per item from :func:`reader.iter_studies` (``workers=0``: in this process), so that
    run reports read the same whatever the worker count."""
    from cspine_submit.read.reader import iter_studies

    workers = max(0, int(workers))
    return iter_studies(items, work_fn, workers=workers, prefetch=max(2, 2 * workers), timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# Time budget


class BudgetController:
    """Keeps a running projection of the finish time and lowers the slices per vertebra when it overshoots.

    Parameters
    ----------
    budget_s : float or None
        Seconds allowed for the whole run (None: no budget).
    n_studies : int
        Studies to process in this run.
    slices_per_vertebra : int
        K to start with (from the model config).
    min_slices : int
        K never goes below this.
    min_history : int
        Studies measured (since the last change of K) before K is changed again.
    safety : float
        Plan to finish within ``safety * budget_s``, leaving room for writing and for slow studies at the end.

    The projection uses the mean seconds per study of the studies done at the current K (studies the workers
    prefetched at an older K are not counted: they would make a change of K look ineffective and lower K again).
    When ``elapsed + remaining * mean`` exceeds the plan, K is scaled by ``time left per study / mean`` (the cost
    per study is roughly proportional to K: decoding and scoring dominate) and rounded down. When the whole budget
    is spent, :attr:`exhausted` is set and the remaining studies get their priors.
    """

    def __init__(self, budget_s, n_studies: int, slices_per_vertebra: int, min_slices: int = 2, safety: float = 0.95,
                 min_history: int = 3):
        self.budget_s = None if budget_s is None else float(budget_s)
        # The first studies carry one-off costs (graph tracing, worker start-up); acting on them alone overreacts.
        self.min_history = max(1, int(min_history))
        self.n_studies = int(n_studies)
        self.k = int(slices_per_vertebra)
        self.min_slices = max(1, min(int(min_slices), self.k))
        self.safety = float(safety)
        self.events: list[dict] = []
        self.exhausted = False
        self._since_change: list[float] = []

    def projected_total(self, elapsed: float, done: int) -> float | None:
        """Projected seconds for the whole run, or None before the first study."""
        if not self._since_change:
            return None
        return elapsed + (self.n_studies - done) * float(np.mean(self._since_change))

    def update(self, study_seconds: float, elapsed: float, done: int, k: int | None = None) -> int:
        """Record one finished study, prepared with ``k`` slices per vertebra (default: the current K); returns
        the K to use for studies submitted from now on."""
        if k is None or int(k) == self.k:
            self._since_change.append(float(study_seconds))
        if self.budget_s is None or done >= self.n_studies:
            return self.k
        if elapsed >= self.budget_s:
            if not self.exhausted:
                self.exhausted = True
                self.events.append({"after_study": done, "elapsed_s": round(elapsed, 3), "action":
                                    f"budget of {self.budget_s:.0f} s spent; the remaining {self.n_studies - done} "
                                    "studies get their priors"})
            return self.k
        projected = self.projected_total(elapsed, done)
        plan = self.safety * self.budget_s
        if (projected is not None and projected > plan and self.k > self.min_slices
                and len(self._since_change) >= self.min_history):
            mean = max(float(np.mean(self._since_change)), 1e-9)
            per_study_left = (plan - elapsed) / (self.n_studies - done)
            new_k = max(self.min_slices, min(self.k - 1, int(math.floor(self.k * per_study_left / mean))))
            self.events.append({
                "after_study": done, "elapsed_s": round(elapsed, 3), "projected_s": round(projected, 3),
                "budget_s": self.budget_s, "slices_per_vertebra": [self.k, new_k],
                "action": f"projected {projected:.0f} s > {plan:.0f} s planned: slices per vertebra {self.k} -> {new_k}",
            })
            self.k = new_k
            self._since_change = []
        return self.k


# ---------------------------------------------------------------------------------------------------------------
# Set-up and run


@dataclass
class RunSetup:
    """Everything decided before the first study: rows, weights, ranges, warnings to announce."""

    plan: Any  # submission.RowPlan
    weights_dir: Path
    config: ModelConfig
    models: dict
    ranges: SliceRanges
    ranges_path: Path
    warnings: list
    notes: list
    fingerprint: str
    demo: bool = False
    load_seconds: float = 0.0
    devices: Any = None  # models.DevicePlan: where the classifiers run, in which precision, and why


def _weights_fingerprint(weights_dir: Path, config: ModelConfig, ranges: SliceRanges, plan) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(_config_dict(config), sort_keys=True).encode())
    h.update(json.dumps(_config_dict(ranges), sort_keys=True, default=str).encode())
    for name in sorted(f for v in config.classifier_files for f in config.classifier_paths(v)):
        p = weights_dir / name
        # Size and mtime, not content: hashing 7 ResNet50 files would cost seconds at every start.
        h.update(f"{name}:{p.stat().st_size if p.exists() else -1}:{p.stat().st_mtime_ns if p.exists() else -1}".encode())
    h.update("\n".join(plan.row_ids).encode())
    h.update("\n".join(str(plan.folders[u]) for u in plan.studies).encode())
    return h.hexdigest()


def _config_dict(obj) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def load_ranges_for(weights_dir: Path) -> tuple[SliceRanges, Path, list[str]]:
    """slice_ranges.json from the weights folder, else the package default ``weights/slice_ranges.json``."""
    notes = []
    path = Path(weights_dir) / "slice_ranges.json"
    if not path.is_file():
        fallback = default_weights_dir() / "slice_ranges.json"
        notes.append(f"{path} not found; using the default slice ranges {fallback}")
        path = fallback
    try:
        from cspine_submit.localize import load_ranges

        ranges = load_ranges(path)
    except ImportError:
        ranges = SliceRanges.from_json(path)
    return ranges, path, notes


def load_models(weights_dir: Path) -> tuple[ModelConfig, dict, list[str]]:
    """Config and every classifier that loads; a vertebra whose classifier file is missing or unreadable is left
    out (it will take its prior, loudly) instead of failing the run.

    Returns ``(config, {vertebra: model}, warnings)``. Raises FileNotFoundError / ValueError only when the folder
    or its model_config.json is missing or malformed (and the folder is not a seed-notebook folder).
    """
    import warnings as _warnings

    from cspine_submit.score.models import load_classifiers

    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"{weights_dir}: weights folder not found")
    config_path = weights_dir / "model_config.json"
    messages: list[str] = []
    config = ModelConfig.from_json(config_path) if config_path.is_file() else None
    wanted = [v for v in VERTEBRAE
              if config is None or (v in config.classifier_files
                                    and all((weights_dir / f).is_file() for f in config.classifier_paths(v)))]
    # The rest are reported by prepare_run as "no classifier". One call, so that a file several vertebrae list
    # (a shared network) is loaded once and they share one model.
    failures: dict = {}
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        try:
            loaded_config, models = load_classifiers(weights_dir, wanted, failures=failures)
        except FileNotFoundError:
            if config is None:
                raise  # neither model_config.json nor the seed notebook's files: nothing to run
            loaded_config, models = config, {}
    for w in caught:
        if "DefaultConfig" in type(w.message).__name__ and str(w.message) not in messages:
            messages.append(str(w.message))
    messages += [f"classifier for {v} could not be loaded ({exc}); {v} gets its prior"
                 for v, exc in failures.items() if not isinstance(exc, FileNotFoundError)]
    return loaded_config, models, messages


def initial_priors(weights_dir: str | Path) -> dict[str, float]:
    """The 8 prior probabilities for the file written before anything is loaded: those of the weights folder's
    model_config.json when it reads, else the defaults (train prevalences). Reads JSON only: no TensorFlow."""
    from cspine_submit.score import aggregate

    try:
        config = ModelConfig.from_json(Path(weights_dir) / "model_config.json")
    except (FileNotFoundError, ValueError):
        config = ModelConfig()
    return aggregate.prior_probabilities(config)


def _placeholder_ranges() -> SliceRanges:
    """Ranges that are never planned with (no classifier is loaded when they are used)."""
    return SliceRanges(method="fraction", layout="competition", per_vertebra={v: {} for v in VERTEBRAE}, n_masks=0,
                       source="placeholder: no slice ranges could be loaded")


def prepare_run(test_dir, test_csv, weights_dir, *, demo: bool = False, batch_size: int | None = None,
                weights_error: str = "raise", plan=None) -> RunSetup:
    """Plan the rows, load classifiers, config and ranges, and collect the warnings to announce.

    Parameters
    ----------
    weights_error : "raise" or "priors"
        What to do when the weights folder or its config cannot be loaded at all: raise (the default: a local
        misconfiguration should stop the run), or carry on with no classifier so that every study gets the
        default priors (the CLI: it writes the complete file, then exits non-zero naming the cause).
    plan : submission.RowPlan, optional
        The rows, if already planned (the CLI plans them first, to write the priors file before loading).

    Raises FileNotFoundError / ValueError for problems that concern the whole run (missing weights, a malformed
    test.csv); per-study problems never raise.
    """
    from cspine_submit.score.models import plan_devices
    from cspine_submit.submit.submission import plan_rows

    t0 = time.perf_counter()
    weights_dir = Path(weights_dir)
    plan = plan_rows(test_dir, test_csv) if plan is None else plan
    try:
        config, models, warnings = load_models(weights_dir)
    except (FileNotFoundError, ValueError) as exc:
        if weights_error != "priors":
            raise
        config, models = ModelConfig(trained_on="untrained", source="defaults: the weights could not be loaded"), {}
        warnings = [f"the weights could not be loaded ({exc}); EVERY study gets the default priors"]
    if batch_size:
        config = config.replace(batch_size=int(batch_size))
    missing = [v for v in VERTEBRAE if v not in models]
    if missing:
        warnings.append(
            f"NO CLASSIFIER for {', '.join(missing)} in {weights_dir}: these vertebrae get their priors "
            f"({', '.join(f'{v}={config.priors.get(v)}' for v in missing)}) for EVERY study"
        )
    if config.trained_on == "synthetic" and not demo:
        warnings.append(
            f"the classifiers in {weights_dir} were trained on SYNTHETIC data (demo weights); their predictions on "
            "real CT are meaningless. Use weights trained on the competition data."
        )
    elif config.trained_on == "untrained":
        warnings.append(f"the classifiers in {weights_dir} are marked trained_on='untrained'")
    try:
        ranges, ranges_path, notes = load_ranges_for(weights_dir)
    except (FileNotFoundError, ValueError) as exc:
        if weights_error != "priors":
            raise
        ranges, ranges_path, notes = _placeholder_ranges(), Path("-"), []
        warnings.append(f"no usable slice ranges ({exc}); EVERY study gets the priors")
        models = {}
    if ranges.method == "profile" and "loo_cost" not in ranges.extra.get("profile_template", {}):
        notes.append(f"the slice ranges {ranges_path} carry no alignment-cost reference (learned before it existed): "
                     "an implausible profile alignment cannot be flagged (re-learn them with learn-ranges to get one)")
    return RunSetup(
        plan=plan, weights_dir=weights_dir, config=config, models=models, ranges=ranges, ranges_path=ranges_path,
        warnings=warnings, notes=list(plan.notes) + notes,
        fingerprint=_weights_fingerprint(weights_dir, config, ranges, plan), demo=demo,
        load_seconds=time.perf_counter() - t0, devices=plan_devices(config).with_placement(models),
    )


@dataclass
class RunResult:
    """What :func:`run_submission` did."""

    out: Path
    report_path: Path
    probabilities: dict  # {row_id: p}
    studies: dict  # the report's per-study entries
    totals: dict


def _fallback_entry(reason: str, seconds: dict | None = None, slices_read: int = 0) -> dict:
    return {"status": "fallback", "reason": reason, "slices_read": int(slices_read), "seconds": dict(seconds or {})}


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

    def __call__(self, crops: dict) -> dict:
        if self.timeout is None:
            return self.score_fn(crops)
        if self._in_a_row >= self.max_timeouts:
            raise ScoringTimeout(f"scoring hung {self._in_a_row} times in a row; not tried again in this run")
        import threading

        box: dict[str, Any] = {}
        done = threading.Event()

        def work() -> None:
            try:
                box["value"] = self.score_fn(crops)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name="scorer", daemon=True).start()
        if not done.wait(self.timeout):
            self.timeouts += 1
            self._in_a_row += 1
            raise ScoringTimeout(f"scoring did not finish within {self.timeout:.0f} s")
        self._in_a_row = 0
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self) -> None:
        """Nothing to release: an abandoned thread is a daemon (kept for symmetry with the other run resources)."""


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


def start_run(setup: RunSetup, out: str | Path, *, resume: bool = False, report_path: str | Path | None = None,
              time_budget: float | None = None, refresh_seconds: float = REFRESH_SECONDS,
              on_study: Callable[[str, dict], None] | None = None, study_timeout: float | None = None) -> RunState:
    """Step 1, prepare: open the journal (taking the studies a killed run finished when resuming), split the studies
    into those to do and those whose folder is missing, set up the time budget, the live submission and the scorer."""
    from cspine_submit.score import aggregate
    from cspine_submit.submit import submission
    from cspine_submit.score.models import score

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
    state.scorer = GuardedScorer(lambda crops: score(setup.models, crops, setup.config.batch_size), study_timeout)
    return state


def write_priors_file(state: RunState) -> None:
    """Step 2: a complete submission.csv at once - priors for every study not done yet (resumed ones kept)."""
    for uid in state.todo_missing:
        state.finish(uid, state.priors, _fallback_entry(f"study folder {state.setup.plan.folders[uid]} does not exist"))
    state.live.write()


def warm_up(state: RunState) -> None:
    """Step 3: trace the scoring graphs once before the clock of the first study starts.

    Otherwise the first study looks several times slower than the rest and the time-budget projection overreacts.
    A failure is a run warning (each study then falls back with its own scoring error), not a crash.
    """
    from cspine_submit.score.crop import encode_crops

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
    from cspine_submit.score import aggregate

    config = state.setup.config
    seconds.update({k: round(v, 4) for k, v in prepared.seconds.items()})
    entry = {"status": "ok", "reason": None, "slices_read": prepared.slices_read, "seconds": seconds,
             "n_slices": prepared.n_slices, "slices_per_vertebra": job.config.slices_per_vertebra}
    if prepared.warnings:
        entry["warnings"] = list(prepared.warnings)
    try:
        t = time.perf_counter()
        slice_probs = state.scorer(prepared.crops) if prepared.crops else {}
        seconds["score"] = round(time.perf_counter() - t, 4)
        t = time.perf_counter()
        probs, from_prior = aggregate.aggregate_study(slice_probs, config)
        seconds["aggregate"] = round(time.perf_counter() - t, 4)
    except Exception as exc:  # noqa: BLE001 - a scoring failure (or hang) costs this study only
        entry = _fallback_entry(f"score: {type(exc).__name__}: {exc}", seconds, prepared.slices_read)
        entry["plan"] = prepared.plan
        state.finish(job.uid, state.priors, entry)
        return
    if from_prior:
        entry["priors_used"] = from_prior
    entry["plan"] = prepared.plan
    state.finish(job.uid, probs, entry)


def _handle_outcome(state: RunState, outcome, t_prev: float) -> None:
    job: StudyJob = outcome.item
    seconds = {"wait": round(time.perf_counter() - t_prev, 4)}
    if outcome.error is None and outcome.value is not None:
        score_study(state, job, outcome.value, seconds)
        return
    if job.folder == "":
        # Skipped for time: not finished, so not journaled - a --resume with time to spare must still do it.
        state.finish(job.uid, state.priors, _fallback_entry("time budget spent before this study; priors used",
                                                            seconds), journaled=False)
    else:
        state.finish(job.uid, state.priors, _fallback_entry(_failure_reason(outcome.error), seconds))


def stream_studies(state: RunState, workers: int = 2, study_timeout: float | None = None,
                   progress: bool = True) -> None:
    """Step 4: workers prepare the studies ahead while this process scores them one by one; the live submission is
    refreshed as they finish; the time budget adjusts K. If the run itself fails (not one study), the studies not
    done get their priors, unjournaled, and a loud warning."""
    from tqdm import tqdm

    bar = tqdm(total=len(state.todo), unit="study", desc="studies", disable=not progress, dynamic_ncols=True)
    state.t_loop = time.perf_counter()
    t_prev, done = state.t_loop, 0
    try:
        for outcome in _iter_outcomes(state.jobs(), _prepare_or_skip, workers, study_timeout):
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
                state.finish(uid, state.priors, _fallback_entry(reason), journaled=False)
    finally:
        bar.close()
        state.journal.close()
        state.scorer.close()


def finish_run(state: RunState) -> RunResult:
    """Step 5: the final submission.csv and the run report."""
    from cspine_submit.submit import submission

    probabilities = state.live.write()
    wall = time.perf_counter() - state.t_start
    if state.scorer.timeouts:
        state.warnings.append(f"scoring hung {state.scorer.timeouts} time(s); those studies got their priors")
    totals = _totals(state, wall)
    submission.write_report(state.report_path, state.studies, totals)
    return RunResult(out=state.out, report_path=state.report_path, probabilities=probabilities,
                     studies=state.studies, totals=totals)


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
    warm_up(state)
    stream_studies(state, workers, study_timeout, progress)
    return finish_run(state)


def _prepare_or_skip(job: StudyJob):
    """Worker entry point: a job without a folder was skipped by the budget; it yields no crops."""
    if not job.folder:
        return None
    return prepare_study(job)


def fell_back(entry: dict) -> bool:
    """True when a study's 8 rows are all priors: it failed, or every vertebra took its prior."""
    return entry["status"] == "fallback" or set(VERTEBRAE) <= set(entry.get("priors_used", ()))


def run_problems(totals: dict) -> list[str]:
    """Why a finished run cannot be right, each naming the cause; empty when it can.

    - no classifier was loaded (every row is a prior);
    - more than half of the studies fell back (:func:`fell_back`), with the most common reasons.
    """
    problems = []
    if totals.get("classifiers_loaded", 0) == 0:
        why = [w for w in totals.get("warnings", []) if "could not be loaded" in w or "NO CLASSIFIER" in w]
        problems.append("no classifier was loaded: every row of the submission is a prior"
                        + (f" ({'; '.join(why)})" if why else ""))
    n, n_back = totals.get("studies", 0), totals.get("fell_back", 0)
    if n and n_back * 2 > n and totals.get("classifiers_loaded", 0):
        reasons = totals.get("fallback_causes", {})
        top = "; ".join(f"{count} x {why}" for why, count in list(reasons.items())[:3])
        problems.append(f"{n_back} of {n} studies fell back to the priors (more than half): {top}")
    return problems


def _cause(reason: str) -> str:
    """A fallback reason without the study-specific part (file names), so that equal causes group."""
    import re

    return re.sub(r"(/[^\s:,;()]+)+", "<path>", str(reason))[:200]


def _totals(state: RunState, wall: float) -> dict:
    from collections import Counter

    studies, setup, budget = state.studies, state.setup, state.budget
    fresh = {u: e for u, e in studies.items() if not e.get("resumed")}
    stage_sums: dict[str, float] = {}
    for e in fresh.values():
        for k, v in e.get("seconds", {}).items():
            stage_sums[k] = round(stage_sums.get(k, 0.0) + float(v), 4)
    n_ok = sum(e["status"] == "ok" for e in studies.values())
    fallbacks = {u: e["reason"] for u, e in studies.items() if e["status"] == "fallback"}
    back = [u for u, e in studies.items() if fell_back(e)]
    causes = Counter(_cause(e["reason"]) if e["status"] == "fallback" else "every vertebra took its prior"
                     for u, e in studies.items() if fell_back(e))
    implausible = [u for u, e in studies.items() if (e.get("plan") or {}).get("alignment", {}).get("plausible") is False]
    return {
        "studies": len(studies),
        "ok": n_ok,
        "fallback": len(fallbacks),
        "fallback_reasons": fallbacks,
        "fell_back": len(back),
        "fallback_causes": dict(causes.most_common()),
        "implausible_alignment": len(implausible),
        "implausible_alignment_studies": implausible,
        "resumed": state.n_resumed,
        "rows": len(setup.plan.row_ids),
        "classifiers_loaded": len(setup.models),
        "slices_read": int(sum(e.get("slices_read", 0) for e in fresh.values())),
        "wall_seconds": round(wall, 3),
        "setup_seconds": round(state.t_loop - state.t_start, 3),
        "load_seconds": round(setup.load_seconds, 3),
        "warmup_seconds": round(state.warmup_seconds, 3),
        "studies_per_s": round(len(fresh) / wall, 4) if wall > 0 else None,
        "seconds_by_stage": stage_sums,
        "submission_refresh": state.live.stats(wall),
        "score_timeouts": state.scorer.timeouts,
        "time_budget": {"budget_s": state.time_budget, "final_slices_per_vertebra": budget.k, "events": budget.events},
        "devices": setup.devices.to_dict() if setup.devices is not None else None,
        "weights": str(setup.weights_dir),
        "slice_ranges": str(setup.ranges_path),
        "trained_on": setup.config.trained_on,
        "demo": setup.demo,
        "notes": list(setup.notes) + list(state.journal_notes),
        "warnings": list(setup.warnings) + list(state.warnings),
    }
