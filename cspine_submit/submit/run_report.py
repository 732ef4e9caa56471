"""The run report's arithmetic: a study's fallback entry, the totals, and why a finished run cannot be right.

Pure functions of the per-study entries (:class:`cspine_submit.submit.run.RunState` holds them); the report file is
written by :func:`cspine_submit.submit.submission.write_report`.
"""

from __future__ import annotations

import re
from collections import Counter

from cspine_submit.config import VERTEBRAE


def fallback_entry(reason: str, seconds: dict | None = None, slices_read: int = 0) -> dict:
    """A report entry for a study whose 8 rows are the priors, saying why."""
    return {"status": "fallback", "reason": reason, "slices_read": int(slices_read), "seconds": dict(seconds or {})}


def all_priors_reason(plan: dict, scored: tuple[str, ...]) -> str:
    """Why a study that was read took its prior for every vertebra, from its plan summary.

    Parameters
    ----------
    plan : dict
        The study's plan summary (:func:`cspine_submit.submit.plan_report.plan_summary`): ``{vertebra: {"prior":
        reason, ...}}`` for the vertebrae given their prior before scoring.
    scored : tuple of str
        The vertebrae a classifier was loaded for.

    Returns
    -------
    str
        E.g. ``"every vertebra took its prior (C1, C2: planned outside the scan; C3-C7: no classifier loaded)"``.
    """
    if not scored:
        return "every vertebra took its prior: no classifier was loaded"
    by_reason: dict[str, list[str]] = {}
    for v in VERTEBRAE:
        why = ((plan or {}).get(v) or {}).get("prior") or "nothing to score"
        by_reason.setdefault(str(why), []).append(v)
    return "every vertebra took its prior (" + "; ".join(f"{', '.join(vs)}: {why}" for why, vs in by_reason.items()) + ")"


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
    """A fallback reason without the study-specific part (file names), so that equal causes group.

    A path is a whole token with a ``/`` in it, relative ones included: ``test_images/1.2.3: ...`` becomes
    ``<path>: ...``, not ``test_images<path>: ...``."""
    return re.sub(r"(?:[^\s:,;()]*/)+[^\s:,;()]*", "<path>", str(reason))[:200]


def report_totals(state, wall: float) -> dict:
    """The report's ``totals``: counts, causes, seconds by stage, the budget's events, devices, weights, warnings.

    Parameters
    ----------
    state : cspine_submit.submit.run.RunState
        The finished run.
    wall : float
        Seconds since the run started.
    """
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
        # bad files in studies that went on without them (one that failed on them names them in its reason)
        "files_skipped": int(sum(e.get("files_skipped", 0) for e in studies.values())),
        "slices_replaced": int(sum(e.get("slices_replaced", 0) for e in studies.values())),
        "studies_with_bad_files": sorted(u for u, e in studies.items()
                                         if e.get("files_skipped") or e.get("slices_replaced")),
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
        "interrupted": state.interrupted,
    }
