"""The worker's job: one study's folder -> model-ready crops (scan, plan, read, crop), or the reason it cannot be.

Runs in the reader's worker processes (:func:`cspine_submit.read.iter_studies`); the main process scores what
comes back (:mod:`cspine_submit.submit.run`). This module must stay importable without TensorFlow: every worker
imports it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cspine_submit import localize
from cspine_submit.config import VERTEBRAE, ModelConfig, SliceRanges
from cspine_submit.read import dicom
from cspine_submit.read.stacks import read_reusing
from cspine_submit.score import crop
from cspine_submit.submit import plan_report

MIN_SLICES = 3
"""Fewer slices than this cannot hold a cervical spine: such a study falls back to priors without planning."""


@dataclass(frozen=True)
class StudyJob:
    """Everything a worker needs to prepare one study (picklable).

    ``folder == ""`` marks a study the time budget skipped: the worker returns nothing for it.
    """

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
    files_skipped : int
        Files of the folder left out by the scan (their header could not be read as a CT slice).
    slices_replaced : int
        Slices whose pixels could not be decoded, each replaced by a readable neighbour.
    """

    uid: str
    crops: dict
    slices_read: int
    n_slices: int
    seconds: dict
    warnings: list = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    files_skipped: int = 0
    slices_replaced: int = 0


class StudyFailure(RuntimeError):
    """A study could not be prepared; the message starts with the failing stage."""


def prepare_study(job: StudyJob) -> PreparedStudy:
    """Scan, plan, read and crop one study (runs in a worker process).

    A file whose header cannot be read is left out by the scan; a slice whose pixels cannot be decoded takes the
    nearest readable slice's pixels (:func:`cspine_submit.read.stacks.read_reusing`). Both are listed in the
    warnings as ``"skipped NAME: reason"``; too many undecodable slices (over half of the cue or of one vertebra's
    planned slices, or none readable nearby) fail the study instead.

    Raises
    ------
    StudyFailure
        Message ``"<stage>: <what went wrong>"``.
    """
    seconds: dict[str, float] = {}
    stage = "scan"
    t = time.perf_counter()
    try:
        header = dicom.scan_study(job.folder)
        seconds["scan"] = time.perf_counter() - t
        warnings = _scan_warnings(job, header)
        stage, t = "plan", time.perf_counter()
        # Whole-number HU (all CT as scanners write it) are kept as int16: slices decode straight into the stack.
        hu_dtype = dicom.hu_dtype(header)
        failed: dict = {}  # slices whose pixels could not be decoded: {index: (reason, stand-in index)}
        cue_indices, cue_slices, cue, planned = _plan(job, header, hu_dtype, warnings, failed)
        not_scored = {v: "no classifier loaded" for v in VERTEBRAE if v not in job.vertebrae}
        summary = plan_report.plan_summary(header, job.ranges, cue, planned, job.config, not_scored=not_scored)
        if alignment_warning := plan_report.implausible_alignment(summary):
            warnings.append(f"planner: {alignment_warning}")
        skip = plan_report.priors_from_summary(summary)  # e.g. a vertebra planned outside the scan
        plans = {v: p for v, p in planned.items() if v not in skip}
        seconds["plan"] = time.perf_counter() - t
        stage, t = "read", time.perf_counter()
        needed = crop.slices_needed(plans, job.config, header.n_slices) if plans else np.zeros(0, dtype=np.int64)
        slices = read_reusing(header, needed, cue_indices, cue_slices, stack="crops", dtype=hu_dtype, failed=failed)
        warnings += _decode_warnings(header, failed, plans)
        seconds["read"] = time.perf_counter() - t
        stage, t = "crop", time.perf_counter()
        crops = {v: crop.prepare_encoded_crops(slices, needed, plan, job.config) for v, plan in plans.items()}
        seconds["crop"] = time.perf_counter() - t
    except Exception as exc:  # noqa: BLE001 - any failure of one study becomes that study's fallback
        raise StudyFailure(f"{stage}: {type(exc).__name__}: {exc}") from None
    slices_read = int(np.union1d(needed, cue_indices).size)
    return PreparedStudy(job.uid, crops, slices_read, header.n_slices, seconds, warnings, plan=summary,
                         files_skipped=len(header.skipped), slices_replaced=len(failed))


def _scan_warnings(job: StudyJob, header) -> list[str]:
    """What the scan found worth saying (skipped files, header oddities); raises when too few slices to plan."""
    if header.n_slices < MIN_SLICES:
        raise ValueError(f"{job.folder}: only {header.n_slices} readable slice(s); a cervical spine needs more")
    warnings = [f"skipped {name}: {why}" for name, why in header.skipped]
    warnings += list(header.warnings)
    if header.study_uid != job.uid:
        warnings.append(f"folder {job.uid} holds StudyInstanceUID {header.study_uid}; rows use the folder name")
    return warnings


def _decode_warnings(header, failed: dict, plans: dict) -> list[str]:
    """The report's lines for slices whose pixels could not be decoded (each replaced by a readable neighbour).

    Raises
    ------
    ValueError
        More than half of one vertebra's planned slices failed: what is left is no longer that vertebra's sample,
        so the study falls back to priors, the reason naming the files.
    """
    for v, plan in plans.items():
        bad = [int(i) for i in plan.slice_indices if int(i) in failed]  # a plan may sample a slice twice
        if 2 * len(bad) > len(plan.slice_indices):
            raise ValueError(f"{len(bad)} of {v}'s {len(plan.slice_indices)} planned slices cannot be decoded ("
                             + _named(header, failed, sorted(set(bad))) + ")")
    return [f"skipped {header.files[i].name}: {reason}" + ("" if sub is None else
            f" (slice {header.files[sub].name} stands in for it)") for i, (reason, sub) in sorted(failed.items())]


def _named(header, failed: dict, indices, most: int = 3) -> str:
    """``"NAME: reason; ..."`` for the first ``most`` of ``indices``."""
    said = "; ".join(f"{header.files[i].name}: {failed[i][0]}" for i in list(indices)[:most])
    return said + ("; ..." if len(indices) > most else "")


def _plan(job: StudyJob, header, hu_dtype, warnings: list[str], failed: dict):
    """Plan the crops of the vertebrae to score.

    A cue slice that cannot be decoded is replaced by a readable neighbour and recorded in ``failed``
    (:func:`cspine_submit.read.stacks.read_reusing`); more than half of them failing is a ValueError (the study's
    priors, the reason naming the files).

    Returns
    -------
    cue_indices : (j,) ndarray of int
        Slices decoded for the profile planner's cue (empty for the other planners).
    cue_slices : (j, rows, cols) ndarray of ``hu_dtype``
        Their HU, in this process's reusable ``"cue"`` stack.
    cue : localize cue or None
    planned : dict
        ``{vertebra: CropPlan}``.
    """
    cue_indices = np.zeros(0, dtype=np.int64)
    cue_slices = np.zeros((0, header.rows, header.cols), dtype=hu_dtype)
    if not job.vertebrae:
        return cue_indices, cue_slices, None, {}  # no classifier at all: nothing to plan (still scanned, to report)
    if job.ranges.method != "profile":
        return cue_indices, cue_slices, None, localize.plan_crops(header, job.ranges, job.config)
    # The profile planner needs a few decoded cue slices: decode them here, so that they count as slices read and
    # so that the crops reuse those the plans also need instead of decoding them again.
    cue_indices = np.asarray(localize.study_cue_indices(header, job.ranges), dtype=np.int64)
    cue_slices = read_reusing(header, cue_indices, cue_indices[:0], cue_slices, stack="cue", dtype=hu_dtype,
                              failed=failed)
    if 2 * len(bad := [i for i in cue_indices.tolist() if i in failed]) > cue_indices.size:
        raise ValueError(f"{len(bad)} of the planner's {cue_indices.size} cue slices cannot be decoded ("
                         + _named(header, failed, bad) + ")")
    cue = localize.measure_cue(header, job.ranges, slices=cue_slices)
    if cue.fallback:
        warnings.append(f"planner: {cue.fallback}")
    return cue_indices, cue_slices, cue, localize.plan_crops(header, job.ranges, job.config, cue=cue)


def prepare_or_skip(job: StudyJob) -> PreparedStudy | None:
    """Worker entry point: a job without a folder was skipped by the time budget; it yields no crops."""
    if not job.folder:
        return None
    return prepare_study(job)


def failure_reason(error: str | None) -> str:
    """The report's reason for a study the workers could not prepare.

    A :class:`StudyFailure` already names its stage and cause (``"read: DicomReadError: <file>: ..."``); the
    reader's ``"StudyFailure: "`` prefix and its ``" (at worker.py:<line>)"`` suffix would only repeat where it was
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
