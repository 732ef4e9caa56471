"""Where each vertebra was looked for, as the run report says it (a study's ``plan`` key), and which vertebrae
the plan puts outside the scan.

One place turns what planning returned (study header, slice ranges, the measured cue, the crop plans) into the
report's summary, so that a user can check the cropper on their own studies::

    {"method": "profile",                    # the localization method actually used
     "fallback_reason": null,                # why the planner fell back to another method, or null
     "scan_z_mm": [0.0, 278.5],              # first and last slice position (mm toward the feet)
     "cue_slices": [3, 17, ...],             # DICOM file numbers decoded for the image cue (profile only)
     "alignment": {"cost": 0.71,             # profile only: cost of the cue's best alignment to the template,
                   "cost_reference": {"n": 11, "q50": 1.0, "q90": 1.6, "max": 2.83},  # the training studies'
                   "threshold": 8.5,         # leave-one-out costs (null in files learned before it existed),
                   "plausible": true,        # cost <= threshold (null: no cost or no reference to judge it by)
                   "warning": null},         # what is wrong when it is not plausible (the study is still scored)
     "C1": {"z_mm": [12.3, 40.1],            # planned range, before the z margin (null if the planner gives none)
            "slices": [9, 11, ...],          # DICOM file numbers decoded for this vertebra's crops
            "box": {"y0": 96, "x0": 160,     # in-plane box, pixels of the slice, half-open:
                    "y1": 288, "x1": 352},   #   rows y0..y1-1, columns x0..x1-1
            "prior": null},                  # why this vertebra took its prior instead, or null
     ...}

"slices" are always DICOM file numbers: the numeric file names (``123.dcm`` -> 123, the competition's slice numbers),
else file names; never 0-based indices. The report's ``legend`` (:data:`REPORT_LEGEND`) says so for its readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.score.crop import slices_needed
from cspine_submit.localize.align import alignment_check

REPORT_LEGEND: dict[str, str] = {
    "slices": "DICOM file numbers (123.dcm -> 123, the competition's slice numbers; a non-numeric file keeps its "
              "name), never 0-based indices",
    "cue_slices": "DICOM file numbers of the slices decoded for the profile planner's image cue",
    "box": "in-plane crop box in pixels of the slice, half-open: rows y0..y1-1, columns x0..x1-1",
    "z_mm": "planned range along the scan, mm toward the feet, before the z margin",
    "scan_z_mm": "positions of the first and last slice, mm toward the feet",
}
"""What the report's plan fields mean, written into the report itself (``legend``)."""

BOX_KEYS = ("y0", "x0", "y1", "x1")


def box_dict(box) -> dict[str, int]:
    """A crop plan's ``(y0, x0, y1, x1)`` box as the report writes it: ``{"y0", "x0", "y1", "x1"}``, ints."""
    return dict(zip(BOX_KEYS, (int(b) for b in box)))


PROFILE_FALLBACK_METHOD = "fraction"
"""What the planner uses when the profile cue could not be aligned (see ``localize.planned_ranges_mm``)."""


def method_used(ranges, cue) -> str:
    """The localization method the planner actually used for a study.

    The cue's own ``method`` when it carries one (planners that can fall back in several ways say which); else
    :data:`PROFILE_FALLBACK_METHOD` when the cue reports a fallback; else ``ranges.method``.
    """
    own = getattr(cue, "method", None)
    if own:
        return str(own)
    if cue is not None and getattr(cue, "fallback", None):
        return PROFILE_FALLBACK_METHOD
    return str(ranges.method)


def file_number(path) -> int | str:
    """``.../123.dcm`` -> 123; a non-numeric file name is returned as is."""
    stem = Path(path).stem
    return int(stem) if stem.isdigit() else Path(path).name


def outside_scan(z_range_mm, z_mm: np.ndarray, spacing_z: float) -> str | None:
    """Why a planned range lies wholly outside the scan, or None when it overlaps it.

    The scan covers ``z[0] - dz/2 .. z[-1] + dz/2`` (each slice stands for its slab).
    """
    if z_range_mm is None:
        return None
    start, end = (float(v) for v in z_range_mm)
    half = 0.5 * float(spacing_z or 0.0)
    top, bottom = float(z_mm[0]) - half, float(z_mm[-1]) + half
    if end < top:
        return f"planned z {start:.1f}..{end:.1f} mm lies above the scan ({top:.1f}..{bottom:.1f} mm)"
    if start > bottom:
        return f"planned z {start:.1f}..{end:.1f} mm lies below the scan ({top:.1f}..{bottom:.1f} mm)"
    return None


def plan_summary(header, ranges, cue, plans: Mapping[str, Any], config: ModelConfig, *,
                 not_scored: Mapping[str, str] | None = None) -> dict:
    """The report's ``plan`` entry of one study.

    Parameters
    ----------
    header : StudyHeader
    ranges : SliceRanges
    cue : Cue or None
        The measured image cue (profile method), as planning returned it.
    plans : {vertebra: CropPlan}
        As planning returned them (before any vertebra is dropped).
    config : ModelConfig
        Which slices a plan's crops need (``channels="neighbours"`` adds the neighbours).
    not_scored : {vertebra: reason}, optional
        Vertebrae that will not be scored for another reason (no classifier): no slices, that reason as ``prior``.

    Returns
    -------
    dict
        See the module docstring. A vertebra whose planned range lies outside the scan has ``slices: []`` and its
        ``prior`` says why; :func:`priors_from_summary` lists them.
    """
    not_scored = dict(not_scored or {})
    z = np.asarray(header.z, dtype=float)
    files = header.files
    summary: dict[str, Any] = {
        "method": method_used(ranges, cue),
        "fallback_reason": getattr(cue, "fallback", None) if cue is not None else None,
        "scan_z_mm": [round(float(z[0]), 2), round(float(z[-1]), 2)] if z.size else None,
    }
    if cue is not None and getattr(cue, "indices", ()):
        summary["cue_slices"] = [file_number(files[int(i)]) for i in cue.indices]
    if cue is not None and ranges.method == "profile" and "profile_template" in ranges.extra:
        summary["alignment"] = alignment_check(getattr(cue, "cost", None), ranges)
    for v in VERTEBRAE:
        plan = plans.get(v)
        if plan is None:
            summary[v] = {"z_mm": None, "slices": [], "box": None, "prior": not_scored.get(v, "not planned")}
            continue
        z_range = getattr(plan, "z_range_mm", None)
        reason = not_scored.get(v) or outside_scan(z_range, z, header.spacing[0])
        if reason is None and not len(plan.slice_indices):
            reason = "no slice planned"
        read = [] if reason else slices_needed({v: plan}, config, header.n_slices).tolist()
        summary[v] = {
            "z_mm": None if z_range is None else [round(float(z_range[0]), 2), round(float(z_range[1]), 2)],
            "slices": [file_number(files[i]) for i in read],
            "box": box_dict(plan.box),
            "prior": reason,
        }
    return summary


def implausible_alignment(summary: Mapping[str, Any]) -> str | None:
    """The summary's alignment warning (the profile cue matched the template far worse than normal studies do),
    or None."""
    return (summary.get("alignment") or {}).get("warning")


def priors_from_summary(summary: Mapping[str, Any]) -> dict[str, str]:
    """``{vertebra: reason}`` for every vertebra the summary gives its prior."""
    return {v: summary[v]["prior"] for v in VERTEBRAE if v in summary and summary[v].get("prior")}
