"""``submit --previews N``: crop previews of the N studies whose profile alignment looked worst, beside the report.

A study whose image cue matched the learned neck badly is the one whose planned vertebra ranges are most likely
off; its preview (:func:`cspine_submit.tools.preview.preview_study`, drawn with the same slice ranges and config
the run planned with) shows where the crops were taken. Writing a preview never fails the run: a study that
cannot be drawn is named with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping


def worst_aligned(studies: Mapping[str, Mapping], n: int) -> list[str]:
    """The ``n`` studies with the highest alignment cost relative to their threshold, worst first.

    Parameters
    ----------
    studies : {uid: report entry}
        The run report's per-study entries; only those whose ``plan.alignment.cost`` is known count (the profile
        planner's studies). Without a threshold (ranges learned before it existed) the raw cost orders them.
    n : int

    Returns
    -------
    list of str
        At most ``n`` uids.
    """
    scored = []
    for uid, entry in studies.items():
        alignment = (entry.get("plan") or {}).get("alignment") or {}
        cost = alignment.get("cost")
        if cost is None:
            continue
        threshold = alignment.get("threshold")
        scored.append((float(cost) / float(threshold) if threshold else float(cost), uid))
    scored.sort(key=lambda pair: (-pair[0], pair[1]))
    return [uid for _, uid in scored[:max(0, int(n))]]


def preview_path(report_path: Path, uid: str) -> Path:
    """``<report folder>/<report stem>.preview_<uid>.png``: beside the report, named after the run and the study."""
    report_path = Path(report_path)
    stem = report_path.name[: -len(".report.json")] if report_path.name.endswith(".report.json") else report_path.stem
    return report_path.parent / f"{stem}.preview_{uid}.png"


def write_previews(setup, studies: Mapping[str, Mapping], report_path: Path, n: int) -> tuple[list[Path], list[str]]:
    """Draw and write the previews of the ``n`` worst-aligned studies.

    Parameters
    ----------
    setup : cspine_submit.submit.setup.RunSetup
        The run's set-up: its slice ranges and config are those the previews plan with, its row plan gives the
        study folders.
    studies : {uid: report entry}
    report_path : Path
        The previews go beside it (:func:`preview_path`).
    n : int

    Returns
    -------
    written : list of Path
    problems : list of str
        One per study that could not be drawn or written, naming it and why; and one when no study has an
        alignment cost (not the profile planner) so nothing could be chosen.
    """
    import cv2  # a heavy optional import: only a run asked for previews pays it

    from cspine_submit.tools.preview import preview_study

    uids = worst_aligned(studies, n)
    if n > 0 and not uids:
        return [], [f"no previews: no study has an alignment cost to rank by (the slice ranges {setup.ranges_path} "
                    f"use the {setup.ranges.method!r} planner, not 'profile')"]
    written, problems = [], []
    for uid in uids:
        path = preview_path(report_path, uid)
        try:
            image, _, _, _ = preview_study(setup.plan.folders[uid], setup.ranges, setup.config)
            if not cv2.imwrite(str(path), image):
                raise OSError(f"cv2.imwrite could not write {path}")
        except Exception as exc:  # noqa: BLE001 - a preview is a help, never a reason to fail the run
            problems.append(f"preview of {uid} not written: {type(exc).__name__}: {exc}")
            continue
        written.append(path)
    return written, problems
