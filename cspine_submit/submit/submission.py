"""Which rows to predict (test.csv), row ids, the atomic submission writer, the resume journal and the run report.

Files written next to the submission (``<out>`` = ``submission.csv``):

- ``<out>`` itself: ``row_id,fractured``, one row per row_id to predict, written to a temporary file in the same
  folder and renamed over the target, so a reader never sees half a file. During a run it is complete from the
  start (priors for the studies not done yet) and rewritten as studies finish (:class:`LiveSubmission`).
- ``<out stem>.journal.jsonl``: one JSON line per finished study, appended and flushed as each finishes, so a killed
  run started again with ``--resume`` skips them. The first line identifies the run (weights fingerprint); records
  of another run are not reused.
- ``<out stem>.report.json``: the run report ``{"studies": {uid: {"status", "reason", "slices_read", "seconds"}},
  "totals": {...}}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from cspine_submit.config import PREDICTION_TYPES
from cspine_submit.files import atomic_write_text

JOURNAL_VERSION = 1


def row_id(study_uid: str, prediction_type: str) -> str:
    """``<StudyInstanceUID>_<prediction_type>``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r}: expected one of {list(PREDICTION_TYPES)}")
    return f"{study_uid}_{prediction_type}"


def study_row_ids(study_uid: str) -> list[str]:
    """The 8 row ids of one study, in PREDICTION_TYPES order."""
    return [row_id(study_uid, t) for t in PREDICTION_TYPES]


@dataclass(frozen=True)
class RowPlan:
    """What to predict.

    Attributes
    ----------
    row_ids : tuple of str
        Every row of the submission, in output order.
    studies : tuple of str
        Study UIDs to process, in order of first appearance in ``row_ids``.
    folders : dict
        ``{uid: Path}`` of each study's folder under the test folder (it may not exist: such a study falls back).
    notes : tuple of str
        What was decided and why (e.g. the public test.csv quirk), for the CLI to print and the report to keep.
    """

    row_ids: tuple[str, ...]
    studies: tuple[str, ...]
    folders: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def study_folders(test_dir: str | Path) -> list[str]:
    """Names of the sub-folders of ``test_dir`` (one per study), sorted; hidden folders are ignored."""
    test_dir = Path(test_dir)
    if not test_dir.is_dir():
        return []
    return sorted(p.name for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_test_csv(path: str | Path) -> list[tuple[str, str, str]]:
    """Rows of a competition test.csv as ``(row_id, StudyInstanceUID, prediction_type)``, in file order.

    Raises ValueError naming the file when a column is missing, a prediction_type is unknown or a row_id does
    not match ``<StudyInstanceUID>_<prediction_type>``.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (test.csv)")
    try:
        df = pd.read_csv(path, dtype=str)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' ParserError / EmptyDataError, a binary file
        raise ValueError(f"{path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    need = {"row_id", "StudyInstanceUID", "prediction_type"}
    if not need <= set(df.columns):
        raise ValueError(f"{path}: expected columns {sorted(need)}, found {list(df.columns)}")
    rows = []
    for i, (rid, uid, kind) in enumerate(zip(df["row_id"], df["StudyInstanceUID"], df["prediction_type"])):
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"{path}: line {i + 2}: prediction_type {kind!r} not in {list(PREDICTION_TYPES)}")
        if rid != f"{uid}_{kind}":
            raise ValueError(f"{path}: line {i + 2}: row_id {rid!r} is not '{uid}_{kind}'")
        rows.append((rid, uid, kind))
    return rows


def plan_rows(test_dir: str | Path, test_csv: str | Path | None = None) -> RowPlan:
    """Decide which rows to predict.

    - With a test.csv: its rows, in its order. Listed studies whose folder is missing still get their rows (they
      fall back to priors later). Exception, the public competition quirk: when *none* of test.csv's studies exist
      under ``test_dir`` but other study folders do, predict those folders instead, 8 rows each, and say so.
    - Without a test.csv (None or the file does not exist): 8 rows for each study folder, and say so.

    Parameters
    ----------
    test_dir : folder holding one sub-folder per study (named by StudyInstanceUID)
    test_csv : path of test.csv, or None
    """
    test_dir = Path(test_dir)
    present = study_folders(test_dir)
    notes: list[str] = []
    rows = None
    if test_csv is not None and Path(test_csv).is_file():
        rows = read_test_csv(test_csv)
        listed = list(dict.fromkeys(uid for _, uid, _ in rows))
        found = [u for u in listed if (test_dir / u).is_dir()]
        if listed and not found and present:
            notes.append(
                f"none of the {len(listed)} studies in {test_csv} exist under {test_dir} (the public test.csv quirk); "
                f"predicting the {len(present)} study folder(s) present instead, 8 rows each"
            )
            rows = None
        elif len(found) < len(listed):
            notes.append(
                f"{len(listed) - len(found)} of {len(listed)} studies in {test_csv} have no folder under {test_dir}; "
                "their rows get the priors"
            )
        if rows is not None and not rows:
            notes.append(f"{test_csv} lists no rows")
    else:
        if test_csv is not None:
            notes.append(f"{test_csv} does not exist; predicting the {len(present)} study folder(s) under {test_dir}")
        else:
            notes.append(f"no test.csv given; predicting the {len(present)} study folder(s) under {test_dir}")
    if rows is None:
        row_ids = [rid for uid in present for rid in study_row_ids(uid)]
        studies = list(present)
    else:
        row_ids = [rid for rid, _, _ in rows]
        studies = list(dict.fromkeys(uid for _, uid, _ in rows))
    if len(set(row_ids)) != len(row_ids):
        raise ValueError(f"{test_csv}: duplicate row_id(s)")
    return RowPlan(
        row_ids=tuple(row_ids),
        studies=tuple(studies),
        folders={u: test_dir / u for u in studies},
        notes=tuple(notes),
    )


def format_probability(p: float) -> str:
    """Fixed text for a probability, so that the same numbers always give the same bytes.

    Eight decimals; a probability within 5e-9 of 0 or 1 (a config ``clip`` of e.g. 1e-9) gets all its digits
    instead, so that the file never says exactly 0 or 1.
    """
    text = f"{float(p):.8f}"
    if float(text) in (0.0, 1.0) and 0.0 < float(p) < 1.0:
        text = f"{float(p):.17g}"
    return text


SUBMISSION_HEADER = "row_id,fractured\n"


def submission_line(rid: str, p: float) -> str:
    """One row of submission.csv, with its newline; the probability must be strictly inside (0, 1)."""
    p = float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"row {rid}: probability {p} is not strictly inside (0, 1)")
    return f"{rid},{format_probability(p)}\n"


def submission_text(row_ids: Iterable[str], probabilities: Mapping[str, float]) -> str:
    """CSV text ``row_id,fractured`` for ``row_ids`` in order; every row must have a probability in (0, 1)."""
    lines = [SUBMISSION_HEADER]
    for rid in row_ids:
        if rid not in probabilities:
            raise KeyError(f"no probability for row {rid}")
        lines.append(submission_line(rid, probabilities[rid]))
    return "".join(lines)


def write_submission(path: str | Path, row_ids: Iterable[str], probabilities: Mapping[str, float]) -> Path:
    """Write submission.csv atomically (see :func:`atomic_write_text`)."""
    return atomic_write_text(path, submission_text(row_ids, probabilities))


def split_row_id(rid: str) -> tuple[str, str]:
    """``<StudyInstanceUID>_<prediction_type>`` -> ``(uid, prediction_type)``; ValueError for anything else."""
    for kind in PREDICTION_TYPES:
        if rid.endswith("_" + kind) and len(rid) > len(kind) + 1:
            return rid[: -len(kind) - 1], kind
    raise ValueError(f"row_id {rid!r} does not end in _<prediction_type> ({list(PREDICTION_TYPES)})")


class LiveSubmission:
    """submission.csv kept complete on disk while a run goes on.

    Every row is there from the first :meth:`write` (the priors for the studies not done yet); finished studies
    replace their rows in memory (:meth:`set_study`), and :meth:`refresh_if_due` rewrites the file atomically when
    ``every_s`` seconds have passed since the last write. A kill at any moment leaves the last complete file.

    Parameters
    ----------
    path : submission.csv
    row_ids : the rows, in output order
    priors : ``{prediction_type: p}`` for rows not done
    every_s : float
        Seconds between rewrites (0: after every finished study).
    """

    def __init__(self, path: str | Path, row_ids: Iterable[str], priors: Mapping[str, float], every_s: float = 30.0):
        self.path = Path(path)
        self.every_s = max(0.0, float(every_s))
        self.row_ids = tuple(row_ids)
        self._probs: list[float] = []
        self._lines: list[str] = []
        self._rows_of: dict[str, list[tuple[int, str]]] = {}
        for i, rid in enumerate(self.row_ids):
            uid, kind = split_row_id(rid)
            self._rows_of.setdefault(uid, []).append((i, kind))
            self._probs.append(float(priors[kind]))
            self._lines.append(submission_line(rid, priors[kind]))
        self._dirty = True
        self._last = float("-inf")
        self.writes = 0
        self.seconds = 0.0
        self.max_seconds = 0.0

    def set_study(self, uid: str, probs: Mapping[str, float]) -> None:
        """Give one study's rows its probabilities (``{prediction_type: p}``); a study without rows is ignored."""
        for i, kind in self._rows_of.get(uid, ()):
            self._lines[i] = submission_line(self.row_ids[i], probs[kind])
            self._probs[i] = float(probs[kind])
            self._dirty = True

    def write(self) -> dict[str, float]:
        """Write the file now (atomically); returns ``{row_id: p}`` as written."""
        import time

        t = time.perf_counter()
        atomic_write_text(self.path, SUBMISSION_HEADER + "".join(self._lines))
        took = time.perf_counter() - t
        self.writes += 1
        self.seconds += took
        self.max_seconds = max(self.max_seconds, took)
        self._dirty = False
        self._last = time.monotonic()
        return dict(zip(self.row_ids, self._probs))

    def refresh_if_due(self) -> bool:
        """Write when something changed and ``every_s`` seconds have passed since the last write."""
        import time

        if self._dirty and time.monotonic() - self._last >= self.every_s:
            self.write()
            return True
        return False

    def stats(self, wall_seconds: float) -> dict:
        """Writes, seconds spent writing, and that as a share of the run's wall time (%)."""
        return {"every_s": self.every_s, "writes": self.writes, "seconds": round(self.seconds, 4),
                "max_write_s": round(self.max_seconds, 4),
                "overhead_pct": round(100.0 * self.seconds / wall_seconds, 3) if wall_seconds > 0 else None}


def companion_paths(out: str | Path) -> tuple[Path, Path]:
    """``(journal path, default report path)`` next to the submission ``out``."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.journal.jsonl"), out.with_name(f"{stem}.report.json")


class Journal:
    """Append-only JSON-lines journal of finished studies, for ``--resume``.

    The first line is a header ``{"journal": 1, "fingerprint": ...}``; each further line is
    ``{"uid": .., "probs": {type: p}, "report": {...}}``, flushed and fsynced when written so that a kill loses at
    most the study in progress. A torn last line (killed mid-write) is ignored on reading.
    """

    def __init__(self, path: str | Path, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._fh = None

    def load(self) -> tuple[dict[str, dict], list[str]]:
        """Records of this run (same fingerprint) as ``{uid: record}``, and notes about anything ignored."""
        notes: list[str] = []
        if not self.path.is_file():
            return {}, notes
        records: dict[str, dict] = {}
        with open(self.path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        header = None
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                notes.append(f"{self.path}: line {i + 1} is incomplete (killed while writing?); ignored")
                continue
            if header is None:
                header = obj
                if obj.get("journal") != JOURNAL_VERSION or obj.get("fingerprint") != self.fingerprint:
                    notes.append(
                        f"{self.path}: written by another run (different weights, config or test folder); "
                        "not resuming from it"
                    )
                    return {}, notes
                continue
            if "uid" in obj and "probs" in obj and set(obj["probs"]) == set(PREDICTION_TYPES):
                records[obj["uid"]] = obj
        return records, notes

    def start(self, keep: bool) -> None:
        """Open for appending; ``keep=False`` starts a new journal (truncating an old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep and self.path.is_file() and self._has_valid_header():
            self._fh = open(self.path, "a", encoding="utf-8")
            # Finish a torn last line so the next record starts on its own line.
            if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
                self._fh.write("\n")
            return
        self._fh = open(self.path, "w", encoding="utf-8")
        self._write({"journal": JOURNAL_VERSION, "fingerprint": self.fingerprint})

    def _has_valid_header(self) -> bool:
        try:
            with open(self.path, encoding="utf-8") as fh:
                head = json.loads(fh.readline())
        except (OSError, json.JSONDecodeError):
            return False
        return head.get("journal") == JOURNAL_VERSION and head.get("fingerprint") == self.fingerprint

    def append(self, uid: str, probs: Mapping[str, float], report: Mapping) -> None:
        """Record one finished study (durably)."""
        self._write({"uid": uid, "probs": {t: float(probs[t]) for t in PREDICTION_TYPES}, "report": dict(report)})

    def _write(self, obj: dict) -> None:
        if self._fh is None:
            raise RuntimeError("Journal.start() first")
        self._fh.write(json.dumps(obj, sort_keys=True) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_report(path: str | Path, studies: Mapping[str, Mapping], totals: Mapping) -> Path:
    """Write the run report ``{"legend": {...}, "studies": {uid: {...}}, "totals": {...}}`` as JSON (atomically);
    the legend says what the plan fields mean (:data:`cspine_submit.submit.plan_report.REPORT_LEGEND`)."""
    from cspine_submit.submit.plan_report import REPORT_LEGEND  # plan_report imports the score stage; this stays light

    report = {"legend": REPORT_LEGEND, "studies": dict(studies), "totals": dict(totals)}
    text = json.dumps(report, indent=2, default=_json_default) + "\n"
    return atomic_write_text(path, text)


def _json_default(obj):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
