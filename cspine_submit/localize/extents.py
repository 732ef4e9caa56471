"""Vertebra extents as the competition's masks define them, from a table of real masks' extents (no images).

The competition's masks label every voxel of a vertebra's bone, processes included, so a vertebra spans 27-33 mm
in z (C2 44 mm with the dens) and neighbours overlap by 11-22 mm. A table of such extents (one row per masked
study: slice count, spacing, and each vertebra's first and last slice, head to feet; the project's
``tests/data/real_competition/vertebra_extents.csv`` holds 58 of the competition's 87 masks) gives:

- header-only truths (:func:`truths_from_extents`): a :class:`~cspine_submit.localize.masks.StudyTruth` per row
  with no in-plane information, which :func:`~cspine_submit.localize.learn.ranges_from_truths` learns the
  header-only ``fraction`` and ``mm_top`` ranges from and :func:`~cspine_submit.localize.evaluate.evaluate_ranges`
  scores them on, leave-one-out;
- each vertebra's top and bottom along the column (:func:`column_extents`: 0 = top of C1, 1 = bottom of C7), whose
  spread between studies is small (sd 0.017-0.045 of the column);
- :func:`with_real_extents`: ranges learned elsewhere (the image template that finds the column, the in-plane
  boxes) with their z-extents replaced by the table's: ``profile`` places each vertebra at its real position along
  the column the template finds, and the header-only fallback and lengths come from the table's geometry.

Axis convention: slice index 0 is the most cranial slice; positions grow toward the feet.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cspine_submit.config import VERTEBRAE, SliceRanges
from cspine_submit.localize.learn import QUANTILES, ranges_from_truths
from cspine_submit.localize.masks import StudyTruth

EXTENT_COLUMNS: tuple[str, ...] = ("StudyInstanceUID", "n", "dz") + tuple(
    f"{v}_{edge}" for v in VERTEBRAE for edge in ("first", "last"))
"""Columns :func:`load_extents` needs (others, such as ``thk`` or ``C1_top_mm``, are ignored)."""

HEADER_ONLY_ROWS: int = 512
"""Rows and columns of a header-only truth: the table holds no in-plane information (the real studies' own size)."""


@dataclass(frozen=True)
class StudyExtents:
    """One masked study of an extents table.

    Attributes
    ----------
    uid : str
    n_slices : int
    dz : float
        Slice spacing, mm.
    z_ranges : dict
        ``{vertebra: (first, last)}`` inclusive slice indices, 0 = the most cranial slice.
    """

    uid: str
    n_slices: int
    dz: float
    z_ranges: dict[str, tuple[int, int]]

    @property
    def column_mm(self) -> tuple[float, float]:
        """(top of C1, bottom of C7), mm below the first slice."""
        return self.z_ranges["C1"][0] * self.dz, self.z_ranges["C7"][1] * self.dz


def load_extents(path: str | Path) -> list[StudyExtents]:
    """Read an extents table (CSV with :data:`EXTENT_COLUMNS`).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        A column is missing, a value does not parse, or a row's ranges are not inside the study or not ordered
        C1 above C7 (the message names the file and the row's study).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such extents table")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in EXTENT_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: columns {missing} missing (expected {list(EXTENT_COLUMNS)})")
        rows = list(reader)
    out = []
    for row in rows:
        uid = row["StudyInstanceUID"]
        try:
            n, dz = int(row["n"]), float(row["dz"])
            z_ranges = {v: (int(row[f"{v}_first"]), int(row[f"{v}_last"])) for v in VERTEBRAE}
        except ValueError as exc:
            raise ValueError(f"{path}: study {uid}: {exc}") from None
        bad = [v for v, (a, b) in z_ranges.items() if not 0 <= a <= b < n]
        if bad or not dz > 0 or z_ranges["C1"][0] >= z_ranges["C7"][1]:
            raise ValueError(f"{path}: study {uid}: ranges {bad or ''} outside its {n} slices, spacing {dz} or C1 "
                             "not above C7")
        out.append(StudyExtents(uid=uid, n_slices=n, dz=dz, z_ranges=z_ranges))
    if not out:
        raise ValueError(f"{path}: no studies")
    return out


def truths_from_extents(extents: Sequence[StudyExtents], *, rows: int = HEADER_ONLY_ROWS,
                        pixel_mm: float = 0.312) -> list[StudyTruth]:
    """Header-only truths: slice positions ``i * dz`` and the table's ranges; the in-plane box is the whole image.

    Good for learning and scoring z (``fraction``, ``mm_top``); their box coverage means nothing.
    """
    out = []
    for e in extents:
        box = (0, 0, rows, rows)
        out.append(StudyTruth(
            uid=e.uid, z_mm=np.arange(e.n_slices) * e.dz, rows=rows, cols=rows, spacing=(e.dz, pixel_mm, pixel_mm),
            z_ranges=dict(e.z_ranges), boxes={v: box for v in VERTEBRAE},
            footprints={v: np.ones((rows, rows), dtype=np.int32) for v in VERTEBRAE}))
    return out


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    out = {f"q{int(round(q * 100)):02d}": float(np.quantile(a, q)) for q in QUANTILES}
    out.update(mean=float(a.mean()), std=float(a.std()))
    return out


def column_extents(extents: Sequence[StudyExtents]) -> dict[str, dict[str, dict[str, float]]]:
    """Each vertebra's top and bottom as a fraction of the column (0 = top of C1, 1 = bottom of C7).

    A slice index ``i`` sits at ``(i - c1_first) / (c7_last - c1_first)``: C1's top is 0 and C7's bottom 1 in
    every study. Returns ``{vertebra: {"top": quantiles, "bottom": quantiles}}`` (quantiles as
    :data:`~cspine_submit.localize.learn.QUANTILES` plus mean and std).
    """
    out = {}
    for v in VERTEBRAE:
        tops, bottoms = [], []
        for e in extents:
            c1, c7 = e.z_ranges["C1"][0], e.z_ranges["C7"][1]
            first, last = e.z_ranges[v]
            tops.append((first - c1) / (c7 - c1))
            bottoms.append((last - c1) / (c7 - c1))
        out[v] = {"top": _quantiles(tops), "bottom": _quantiles(bottoms)}
    return out


def _profile_entry(column: dict[str, dict[str, float]], ref_length_mm: float) -> dict[str, dict[str, float]]:
    """Column fractions -> the ``profile`` frame: reference mm from the column centre (C1 top at -L/2, C7 bottom
    at +L/2 for the template's reference length L)."""
    def to_ref(q: dict[str, float]) -> dict[str, float]:
        return {k: (ref_length_mm * val if k == "std" else ref_length_mm * (val - 0.5)) for k, val in q.items()}

    return {"start": to_ref(column["top"]), "end": to_ref(column["bottom"])}


def with_real_extents(ranges: SliceRanges, extents: Sequence[StudyExtents], *, table: str) -> SliceRanges:
    """``ranges`` with every z-extent taken from an extents table; its template and in-plane boxes kept.

    - ``profile``: each vertebra's start and end along the column (:func:`column_extents`) in the template's
      reference frame, so the template learned from ``ranges``' studies finds the column and the table says where
      each vertebra sits in it (C1's top and C7's bottom stay where the template puts them).
    - ``fraction`` and ``mm_top`` (the header-only fallback), ``length_mm`` and ``extra["header_column"]`` (the
      column model the fallback plans with): learned from the table's geometry by
      :func:`~cspine_submit.localize.learn.ranges_from_truths` on :func:`truths_from_extents`.
    - ``extra["z_extents"]``: the table, its study count and the column fractions; ``source`` says what came from
      where.

    Parameters
    ----------
    ranges : SliceRanges
        Learned from studies with images (``profile``), e.g. by ``learn-ranges --images``.
    extents : list of StudyExtents
        :func:`load_extents`.
    table : str
        How the table is named in ``source`` (its path).
    """
    if "profile_template" not in ranges.extra:
        raise ValueError("with_real_extents needs ranges learned with images (a profile template finds the column)")
    header = ranges_from_truths(truths_from_extents(extents), method="fraction", layout=ranges.layout)
    column = column_extents(extents)
    ref_length = float(ranges.extra["column_length_mm"]["q50"])
    per_vertebra: dict[str, dict[str, Any]] = {}
    for v in VERTEBRAE:
        entry = dict(ranges.per_vertebra[v])
        entry["profile"] = _profile_entry(column[v], ref_length)
        for key in ("fraction", "mm_top", "length_mm"):
            entry[key] = header.per_vertebra[v][key]
        per_vertebra[v] = entry
    extra = {**ranges.extra, "z_extents": {"table": table, "n_studies": len(extents), "column_fractions": column,
                                           "reference_length_mm": ref_length}}
    # The header-only column model is the table's too: one learned from the image studies (whole volumes, not
    # cut like the competition's) would not say where a competition study's neck sits.
    extra.pop("header_column", None)
    if "header_column" in header.extra:
        extra["header_column"] = header.extra["header_column"]
    source = (f"z-extents of each vertebra (whole bone, as the competition's masks label it) along the column, and "
              f"the header-only fallback (fraction, mm_top, and the column model: C1 top and C7 bottom from the "
              f"study's z extent and slice spacing by least squares) and lengths: {len(extents)} competition "
              f"masks' extents "
              f"({table}); the image template that finds the column (profile) and the in-plane boxes: "
              f"{ranges.n_masks} studies with images ({ranges.source})")
    return dataclasses.replace(ranges, per_vertebra=per_vertebra, extra=extra, source=source)
