"""The streaming submission flow: test folder -> submission.csv, never crashing on a bad study.

Per study, in worker processes (:func:`prepare_study`, run through :func:`cspine_submit.reader.iter_studies`):
scan headers -> plan crops -> decode only the planned slices -> prepare model crops. In the main process, while
the workers already prepare the next studies: score the crops with the classifiers, aggregate to the 8
probabilities, append the study to the journal. At the end the submission is written atomically, with a run report.

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

from cspine_submit.config import PREDICTION_TYPES, VERTEBRAE, ModelConfig, SliceRanges

MIN_SLICES = 3
"""Fewer slices than this cannot hold a cervical spine: such a study falls back to priors without planning."""

WORKER_STAGES = ("scan", "plan", "read", "crop")
MAIN_STAGES = ("wait", "score", "aggregate")


def repo_root() -> Path:
    """The folder holding the package directory (the repo, or the Kaggle dataset folder)."""
    return Path(__file__).resolve().parent.parent


def default_weights_dir() -> Path:
    """``weights/`` beside the package (works for editable installs and for the Kaggle dataset folder)."""
    return repo_root() / "weights"


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
        ``{vertebra: (k, S, S, C) float32}``.
    slices_read : int
        Distinct slices decoded.
    n_slices : int
        Slices in the study.
    seconds : dict
        ``{stage: seconds}`` for scan, plan, read, crop.
    warnings : list of str
    """

    uid: str
    crops: dict
    slices_read: int
    n_slices: int
    seconds: dict
    warnings: list = field(default_factory=list)


class StudyFailure(RuntimeError):
    """A study could not be prepared; the message starts with the failing stage."""


def prepare_study(job: StudyJob) -> PreparedStudy:
    """Scan, plan, read and crop one study (runs in a worker process).

    Raises
    ------
    StudyFailure
        Message ``"<stage>: <what went wrong>"``.
    """
    from cspine_submit import crop, dicom, localize

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
        cue_indices = np.zeros(0, dtype=np.int64)
        cue_slices = np.zeros((0, header.rows, header.cols), dtype=np.float32)
        if not job.vertebrae:
            plans = {}  # no classifier at all: nothing to plan (the study is still scanned, to report on it)
        elif job.ranges.method == "profile":
            # The profile planner needs a few decoded cue slices: decode them here, so that they count as slices
            # read and so that the crops below reuse those the plans also need instead of decoding them again.
            cue_indices = np.asarray(localize.study_cue_indices(header, job.ranges), dtype=np.int64)
            cue_slices = dicom.read_slices(header, cue_indices)
            cue = localize.measure_cue(header, job.ranges, slices=cue_slices)
            if cue.fallback:
                warnings.append(f"planner: {cue.fallback}")
            plans = localize.plan_crops(header, job.ranges, job.config, cue=cue)
        else:
            plans = localize.plan_crops(header, job.ranges, job.config)
        plans = {v: p for v, p in plans.items() if v in job.vertebrae and len(p.slice_indices)}
        seconds["plan"] = time.perf_counter() - t
        stage, t = "read", time.perf_counter()
        needed = crop.slices_needed(plans, job.config, header.n_slices) if plans else np.zeros(0, dtype=np.int64)
        slices = _read_reusing(header, needed, cue_indices, cue_slices)
        seconds["read"] = time.perf_counter() - t
        stage, t = "crop", time.perf_counter()
        crops = {v: crop.prepare_crops(slices, needed, plan, job.config) for v, plan in plans.items()}
        seconds["crop"] = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - any failure of one study becomes that study's fallback
        raise StudyFailure(f"{stage}: {type(exc).__name__}: {exc}") from None
    slices_read = int(np.union1d(needed, cue_indices).size)
    return PreparedStudy(job.uid, crops, slices_read, header.n_slices, seconds, warnings)


def _read_reusing(header, indices: np.ndarray, known_indices: np.ndarray, known_slices: np.ndarray) -> np.ndarray:
    """HU slices ``indices`` of a study, decoding only those not already in ``known_slices``.

    Parameters
    ----------
    header : StudyHeader
    indices : (m,) ndarray of int
        Slices wanted, head to feet indices.
    known_indices : (j,) ndarray of int
        Slices already decoded (e.g. the planner's cue slices), unique.
    known_slices : (j, rows, cols) ndarray of float32
        Their HU, in ``known_indices`` order.

    Returns
    -------
    (m, rows, cols) ndarray of float32
        HU in the order of ``indices``.
    """
    from cspine_submit import dicom

    indices = np.asarray(indices, dtype=np.int64)
    have = {int(i): r for r, i in enumerate(known_indices)}
    fresh = np.array([i for i in indices if int(i) not in have], dtype=np.int64)
    decoded = dict(zip(fresh.tolist(), dicom.read_slices(header, fresh))) if fresh.size else {}
    out = np.empty((indices.size, header.rows, header.cols), dtype=np.float32)
    for k, i in enumerate(indices.tolist()):
        out[k] = known_slices[have[i]] if i in have else decoded[i]
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
    from cspine_submit.reader import iter_studies

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

    from cspine_submit.models import load_classifiers

    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise FileNotFoundError(f"{weights_dir}: weights folder not found")
    config_path = weights_dir / "model_config.json"
    messages: list[str] = []
    config = ModelConfig.from_json(config_path) if config_path.is_file() else None
    models: dict = {}
    for v in VERTEBRAE:
        if config is not None and not (v in config.classifier_files
                                       and all((weights_dir / f).is_file() for f in config.classifier_paths(v))):
            continue  # reported by prepare_run as "no classifier"
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            try:
                loaded_config, loaded = load_classifiers(weights_dir, [v])
            except FileNotFoundError:
                if config is None:
                    raise  # neither model_config.json nor the seed notebook's files: nothing to run
                continue
            except (ValueError, OSError) as exc:
                messages.append(f"classifier for {v} could not be loaded ({exc}); {v} gets its prior")
                continue
        messages += [str(w.message) for w in caught if "DefaultConfig" in type(w.message).__name__
                     and str(w.message) not in messages]
        config = loaded_config
        models[v] = loaded[v]
    return config, models, messages


def _placeholder_ranges() -> SliceRanges:
    """Ranges that are never planned with (no classifier is loaded when they are used)."""
    return SliceRanges(method="fraction", layout="competition", per_vertebra={v: {} for v in VERTEBRAE}, n_masks=0,
                       source="placeholder: no slice ranges could be loaded")


def prepare_run(test_dir, test_csv, weights_dir, *, demo: bool = False, batch_size: int | None = None,
                weights_error: str = "raise") -> RunSetup:
    """Plan the rows, load classifiers, config and ranges, and collect the warnings to announce.

    Parameters
    ----------
    weights_error : "raise" or "priors"
        What to do when the weights folder or its config cannot be loaded at all: raise (the default: a local
        misconfiguration should stop the run), or carry on with no classifier so that every study gets the
        default priors (on Kaggle, where a complete submission scores and a crash does not).

    Raises FileNotFoundError / ValueError for problems that concern the whole run (missing weights, a malformed
    test.csv); per-study problems never raise.
    """
    from cspine_submit.submission import plan_rows

    t0 = time.perf_counter()
    weights_dir = Path(weights_dir)
    plan = plan_rows(test_dir, test_csv)
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
    return RunSetup(
        plan=plan, weights_dir=weights_dir, config=config, models=models, ranges=ranges, ranges_path=ranges_path,
        warnings=warnings, notes=list(plan.notes) + notes,
        fingerprint=_weights_fingerprint(weights_dir, config, ranges, plan), demo=demo,
        load_seconds=time.perf_counter() - t0,
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
    on_study : called as ``on_study(uid, report_entry)`` after each study is journaled (tests use it to simulate
        a kill)
    study_timeout : seconds one study may spend in a worker before it is abandoned (falls back); workers > 0 only
    """
    from tqdm import tqdm

    from cspine_submit import aggregate, submission
    from cspine_submit.models import score

    out = Path(out)
    journal_path, default_report = submission.companion_paths(out)
    report_path = Path(report_path) if report_path else default_report
    config = setup.config
    priors = aggregate.prior_probabilities(config)
    t_start = time.perf_counter()

    journal = submission.Journal(journal_path, setup.fingerprint)
    done_records, journal_notes = journal.load() if resume else ({}, [])
    journal.start(keep=resume)

    study_probs: dict[str, dict[str, float]] = {}
    studies: dict[str, dict] = {}
    for uid, rec in done_records.items():
        if uid in setup.plan.folders:
            study_probs[uid] = rec["probs"]
            studies[uid] = dict(rec["report"], resumed=True)

    todo_missing, todo = [], []
    for uid in setup.plan.studies:
        if uid in study_probs:
            continue
        folder = setup.plan.folders[uid]
        (todo if Path(folder).is_dir() else todo_missing).append(uid)

    budget = BudgetController(time_budget, len(todo), config.slices_per_vertebra)
    vertebrae = tuple(v for v in VERTEBRAE if v in setup.models)
    configs: dict[int, ModelConfig] = {config.slices_per_vertebra: config}

    def job_config() -> ModelConfig:
        if budget.k not in configs:
            configs[budget.k] = config.replace(slices_per_vertebra=budget.k)
        return configs[budget.k]

    def jobs():
        # A generator, so each job takes the K in force when the reader pulls it (after earlier studies finished).
        for uid in todo:
            if budget.exhausted:
                yield StudyJob(uid, "", setup.ranges, config, ())  # not prepared: see below
            else:
                yield StudyJob(uid, str(setup.plan.folders[uid]), setup.ranges, job_config(), vertebrae)

    def finish(uid: str, probs: dict, entry: dict, journaled: bool = True) -> None:
        study_probs[uid] = probs
        studies[uid] = entry
        if journaled:
            journal.append(uid, probs, entry)
        if on_study is not None:
            on_study(uid, entry)

    for uid in todo_missing:
        finish(uid, priors, _fallback_entry(f"study folder {setup.plan.folders[uid]} does not exist"))

    run_warnings: list[str] = []
    t_warm = time.perf_counter()
    if todo and setup.models:
        # Trace the scoring graphs once before the clock of the first study starts: otherwise the first study
        # looks several times slower than the rest and the time-budget projection overreacts.
        shape = (config.slices_per_vertebra,) + tuple(config.input_shape)
        try:
            score(setup.models, {v: np.zeros(shape, np.float32) for v in setup.models}, config.batch_size)
        except Exception as exc:  # noqa: BLE001 - the studies then fall back one by one, each with the reason
            run_warnings.append(f"the classifiers failed on a warm-up batch of shape {shape} "
                                f"({type(exc).__name__}: {exc}); studies whose scoring fails get their priors")
    warmup_s = time.perf_counter() - t_warm
    bar = tqdm(total=len(todo), unit="study", desc="studies", disable=not progress, dynamic_ncols=True)
    t_loop = time.perf_counter()
    t_prev = t_loop
    done = 0
    try:
        outcomes = _iter_outcomes(jobs(), _prepare_or_skip, workers, study_timeout)
        for outcome in outcomes:
            job: StudyJob = outcome.item
            t_got = time.perf_counter()
            seconds = {"wait": round(t_got - t_prev, 4)}
            if outcome.error is not None or outcome.value is None:
                reason = _failure_reason(outcome.error)
                skipped = job.folder == ""
                if skipped:
                    reason = "time budget spent before this study; priors used"
                # A study skipped for time is not finished: --resume (with time to spare) must still do it.
                finish(job.uid, priors, _fallback_entry(reason, seconds), journaled=not skipped)
            else:
                prepared: PreparedStudy = outcome.value
                seconds.update({k: round(v, 4) for k, v in prepared.seconds.items()})
                entry = {"status": "ok", "reason": None, "slices_read": prepared.slices_read, "seconds": seconds,
                         "n_slices": prepared.n_slices, "slices_per_vertebra": job.config.slices_per_vertebra}
                if prepared.warnings:
                    entry["warnings"] = list(prepared.warnings)
                try:
                    t = time.perf_counter()
                    slice_probs = score(setup.models, prepared.crops, config.batch_size) if prepared.crops else {}
                    seconds["score"] = round(time.perf_counter() - t, 4)
                    t = time.perf_counter()
                    probs, from_prior = aggregate.aggregate_study(slice_probs, config)
                    seconds["aggregate"] = round(time.perf_counter() - t, 4)
                except Exception as exc:  # noqa: BLE001 - a scoring failure costs this study only
                    finish(job.uid, priors, _fallback_entry(f"score: {type(exc).__name__}: {exc}", seconds,
                                                            prepared.slices_read))
                else:
                    if from_prior:
                        entry["priors_used"] = from_prior
                    finish(job.uid, probs, entry)
            done += 1
            t_prev = time.perf_counter()
            elapsed = t_prev - t_start
            budget.update(t_prev - t_got + seconds.get("wait", 0.0), elapsed, done, k=job.config.slices_per_vertebra)
            projected = budget.projected_total(elapsed, done)
            if projected is not None:
                finish_at = time.strftime("%H:%M:%S", time.localtime(time.time() + projected - elapsed))
                bar.set_postfix_str(f"K={budget.k} finish~{finish_at}", refresh=False)
            bar.update(1)
    except Exception as exc:  # noqa: BLE001 - the run itself failed (not one study): still write every row
        # E.g. the worker pool cannot start. The studies not done yet get their priors, are not journaled (so
        # --resume does them), and the submission below is still complete.
        reason = f"run stopped before this study: {type(exc).__name__}: {exc}"
        run_warnings.append(f"THE RUN STOPPED EARLY ({type(exc).__name__}: {exc}); "
                            f"{sum(u not in studies for u in todo)} studies got their priors")
        for uid in todo:
            if uid not in studies:
                finish(uid, priors, _fallback_entry(reason), journaled=False)
    finally:
        bar.close()
        journal.close()

    probabilities: dict[str, float] = {}
    for uid in setup.plan.studies:
        probs = study_probs.get(uid, priors)
        for t in PREDICTION_TYPES:
            probabilities[f"{uid}_{t}"] = float(probs[t])
    submission.write_submission(out, setup.plan.row_ids, probabilities)
    wall = time.perf_counter() - t_start
    totals = _totals(studies, setup, wall, t_loop - t_start, budget, journal_notes, len(done_records), time_budget)
    totals["warmup_seconds"] = round(warmup_s, 3)
    totals["warnings"] += run_warnings
    submission.write_report(report_path, studies, totals)
    return RunResult(out=out, report_path=report_path, probabilities=probabilities, studies=studies, totals=totals)


def _prepare_or_skip(job: StudyJob):
    """Worker entry point: a job without a folder was skipped by the budget; it yields no crops."""
    if not job.folder:
        return None
    return prepare_study(job)


def _totals(studies, setup, wall, setup_s, budget, journal_notes, n_resumed, time_budget) -> dict:
    fresh = {u: e for u, e in studies.items() if not e.get("resumed")}
    stage_sums: dict[str, float] = {}
    for e in fresh.values():
        for k, v in e.get("seconds", {}).items():
            stage_sums[k] = round(stage_sums.get(k, 0.0) + float(v), 4)
    n_ok = sum(e["status"] == "ok" for e in studies.values())
    fallbacks = {u: e["reason"] for u, e in studies.items() if e["status"] == "fallback"}
    return {
        "studies": len(studies),
        "ok": n_ok,
        "fallback": len(fallbacks),
        "fallback_reasons": fallbacks,
        "resumed": n_resumed,
        "rows": len(setup.plan.row_ids),
        "slices_read": int(sum(e.get("slices_read", 0) for e in fresh.values())),
        "wall_seconds": round(wall, 3),
        "setup_seconds": round(setup_s, 3),
        "load_seconds": round(setup.load_seconds, 3),
        "studies_per_s": round(len(fresh) / wall, 4) if wall > 0 else None,
        "seconds_by_stage": stage_sums,
        "time_budget": {"budget_s": time_budget, "final_slices_per_vertebra": budget.k, "events": budget.events},
        "weights": str(setup.weights_dir),
        "slice_ranges": str(setup.ranges_path),
        "trained_on": setup.config.trained_on,
        "demo": setup.demo,
        "notes": list(setup.notes) + list(journal_notes),
        "warnings": list(setup.warnings),
    }
