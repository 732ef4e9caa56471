"""Choosing a study's slices and ordering them head to feet, from their headers alone.

:func:`order_slices` runs these steps in order, each a function a test can call:

1. :func:`main_group`: the largest group of files sharing (SeriesInstanceUID, Rows, Columns) is the study;
2. :func:`series_normal`: the series' ImageOrientationPatient and its slice normal;
3. :func:`drop_off_plane`: slices tilted off the series plane (a localizer) are left out;
4. :func:`z_from_positions`: z from ImagePositionPatient projected on the normal, when the positions separate the
   slices; else :func:`z_from_names`: by InstanceNumber, then by the numeric file name, then in file-name order;
5. :func:`drop_duplicates`: slices at the same z keep the first file in name order;
6. :func:`slice_spacing`: the median z step, and a warning for uneven steps;
7. :func:`name_order_reversed`: whether file-name order ran feet to head.

Axis convention: z in mm grows from head to feet.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cspine_submit.read.slice_header import SliceInfo


def natural_key(name: str) -> tuple:
    """Sort key for file names that orders embedded numbers by value (``2.dcm`` before ``10.dcm``)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


def _numeric_stem(path: Path) -> float | None:
    try:
        return float(path.name.split(".")[0]) if path.name.split(".")[0] else None
    except ValueError:
        return None


@dataclass(frozen=True)
class SliceOrder:
    """Result of :func:`order_slices`: which slices to keep, in which order, and why others were dropped."""

    kept: tuple[SliceInfo, ...]
    z: np.ndarray
    dz: float
    orientation: np.ndarray
    reversed: bool
    skipped: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]


_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def main_group(infos: Sequence[SliceInfo]) -> tuple[list[SliceInfo], list[tuple[str, str]]]:
    """The largest group of slices sharing (SeriesInstanceUID, Rows, Columns); ties go to the first in name order.

    Parameters
    ----------
    infos : sequence of SliceInfo
        In file-name order.

    Returns
    -------
    group : list of SliceInfo
        The group, in the order of ``infos``.
    skipped : list of (file name, reason)
        The other slices.
    """
    groups = Counter((s.series_uid, s.rows, s.cols) for s in infos)
    (series, rows, cols), _ = max(groups.items(), key=lambda kv: kv[1])
    group, skipped = [], []
    for s in infos:
        if s.series_uid != series:
            other, main = s.series_uid or "(empty)", series or "(empty)"
            skipped.append((s.path.name, f"other series {other} (study series is {main})"))
        elif (s.rows, s.cols) != (rows, cols):
            skipped.append((s.path.name, f"slice size {s.rows}x{s.cols} differs from the study's {rows}x{cols}"))
        else:
            group.append(s)
    return group, skipped


def series_normal(group: Sequence[SliceInfo]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The series' orientation (the most common ImageOrientationPatient, rounded to 4 decimals) and its unit normal.

    Returns
    -------
    orientation : (6,) ndarray of float64
        Axial ``(1, 0, 0, 0, 1, 0)`` when no slice states one (with a warning).
    normal : (3,) ndarray of float64
        The cross product of the row and column cosines, unit length (patient LPS).
    warnings : list of str
    """
    warns = []
    rounded: dict[bytes, tuple] = {}  # np.round once per distinct orientation (a series has one)
    orients = []
    for s in group:
        if s.orientation is not None:
            key = s.orientation.tobytes()
            if key not in rounded:
                rounded[key] = tuple(np.round(s.orientation, 4))
            orients.append(rounded[key])
    if orients:
        orientation = np.asarray(Counter(orients).most_common(1)[0][0], dtype=np.float64)
    else:
        orientation = _AXIAL.copy()
        warns.append("no ImageOrientationPatient: assuming axial slices (1,0,0,0,1,0)")
    normal = np.cross(orientation[:3], orientation[3:])
    return orientation, normal / (np.linalg.norm(normal) or 1.0), warns


def drop_off_plane(group: Sequence[SliceInfo], normal: np.ndarray) -> tuple[list[SliceInfo], list[tuple[str, str]]]:
    """Leave out slices whose own normal is more than about 1 degree off ``normal`` (e.g. a localizer).

    Slices without an orientation are kept. Returns the kept slices (same order) and ``(file name, reason)`` of the
    others.
    """
    keep, skipped = [], []
    alignment: dict[bytes, float] = {}  # per distinct orientation (a series has one): np.cross costs ~15 us a call
    for s in group:
        if s.orientation is not None:
            key = s.orientation.tobytes()
            cos = alignment.get(key)
            if cos is None:
                n = np.cross(s.orientation[:3], s.orientation[3:])
                cos = alignment[key] = abs(float(n @ normal)) / (np.linalg.norm(n) or 1.0)
            if cos < 0.9998:  # > ~1 degree off the series plane
                skipped.append((s.path.name, "ImageOrientationPatient differs from the series (e.g. a localizer)"))
                continue
        keep.append(s)
    return keep, skipped


def z_from_positions(group: Sequence[SliceInfo], normal: np.ndarray, sign: float) -> tuple[
        list[SliceInfo], np.ndarray | None, list[tuple[str, str]], list[str]]:
    """z of each slice from ImagePositionPatient projected on ``normal``, times ``sign`` (mm, toward the feet).

    Returns
    -------
    group : list of SliceInfo
        The slices with a position (the others are skipped); when the positions are unusable, ``group`` with every
        position cleared (so that no later step reads them).
    z : (n,) ndarray of float64 or None
        One per slice of ``group``; None when no slice has a position, or when the positions do not separate the
        slices (a broken header copied to every file would otherwise keep one slice and drop the rest as
        duplicates): the caller orders by :func:`z_from_names` instead.
    skipped : list of (file name, reason)
    warnings : list of str
    """
    with_pos = [s for s in group if s.position is not None]
    warns: list[str] = []
    if len(with_pos) >= 3:
        z_pos = np.round(np.array([s.position @ normal for s in with_pos]), 3)
        distinct, copies = np.unique(z_pos, return_counts=True)
        # Every position repeated the same number of times: the series written twice (a real training study's
        # files 542-1082 repeat files 1-541), not a broken header; drop_duplicates keeps one slice per position.
        repeated = len(distinct) >= 3 and copies.min() == copies.max() >= 2
        if repeated:
            warns.append(f"every ImagePositionPatient repeats {int(copies[0])} times ({len(with_pos)} files, "
                         f"{len(distinct)} positions): kept one slice per position, the first in file-name order")
        elif 2 * len(distinct) <= len(with_pos):
            warns.append(f"ImagePositionPatient gives only {len(distinct)} distinct position(s) for "
                         f"{len(with_pos)} slices: ignored")
            return [dataclasses.replace(s, position=None) for s in group], None, [], warns
    if not with_pos:
        return list(group), None, [], warns
    skipped = [(s.path.name, "no ImagePositionPatient while the other slices have one")
               for s in group if s.position is None]
    return with_pos, sign * np.array([s.position @ normal for s in with_pos]), skipped, warns


def z_from_names(group: Sequence[SliceInfo], dz: float) -> tuple[np.ndarray, bool, list[str]]:
    """z without positions: rank by InstanceNumber, else by numeric file name, else keep file-name order; ``dz`` mm
    apart.

    Returns
    -------
    z : (n,) ndarray of float64
        One per slice of ``group``.
    by_name : bool
        True when the order is the file names' (numeric or not), False for InstanceNumber.
    warnings : list of str
        Which rule ordered the slices.
    """
    numbers = [s.instance_number for s in group]
    by_name = True
    if None not in numbers and len(set(numbers)) == len(numbers):
        rank = np.array(numbers, dtype=np.float64)
        warn = ("no ImagePositionPatient: ordered by InstanceNumber (assumed to grow head to feet), "
                f"dz {dz} mm from SliceThickness/SpacingBetweenSlices")
        by_name = False
    else:
        stems = [_numeric_stem(s.path) for s in group]
        if all(v is not None for v in stems) and len(set(stems)) == len(stems):
            rank = np.array(stems, dtype=np.float64)
            warn = ("no ImagePositionPatient or InstanceNumber: ordered by the numeric file name "
                    f"(assumed to grow head to feet), dz {dz} mm")
        else:
            rank = np.arange(len(group), dtype=np.float64)
            warn = f"no ImagePositionPatient, InstanceNumber or numeric file names: kept file-name order, dz {dz} mm"
    order = np.argsort(rank, kind="stable")
    z = np.empty(len(group))
    z[order] = np.arange(len(group)) * dz
    return z, by_name, [warn]


def drop_duplicates(group: Sequence[SliceInfo], z_all: np.ndarray) -> tuple[list[int], list[tuple[str, str]]]:
    """Sort head to feet; slices within 1 um of the previous kept one are duplicates and keep the first file in
    ``group`` (file-name) order.

    Returns
    -------
    kept : list of int
        Indices into ``group``, head to feet.
    skipped : list of (file name, reason)
    """
    order = np.argsort(z_all, kind="stable")
    kept: list[int] = []
    skipped = []
    for i in order:
        if kept and abs(z_all[i] - z_all[kept[-1]]) < 1e-3:
            skipped.append((group[i].path.name, f"duplicate position of {group[kept[-1]].path.name}"))
            continue
        kept.append(int(i))
    return kept, skipped


def slice_spacing(z: np.ndarray, stated: float | None) -> tuple[float, list[str]]:
    """The median z step (mm, float noise of decimal positions rounded off), ``stated`` (or 1.0) for one slice; a
    warning when steps differ from the median by more than 10% + 0.01 mm."""
    if len(z) <= 1:
        return float(stated or 1.0), []
    steps = np.diff(z)
    dz = round(float(np.median(steps)), 6)
    uneven = np.abs(steps - dz) > 0.1 * dz + 0.01
    if not uneven.any():
        return dz, []
    return dz, [f"uneven slice spacing: {int(uneven.sum())} step(s) differ from the median {dz:.3f} mm "
                f"(min {steps.min():.3f}, max {steps.max():.3f} mm)"]


def name_order_reversed(z: np.ndarray, kept_idx: Sequence[int]) -> bool:
    """True when file-name order ran feet to head: z decreases along it in at least 90% of the steps (so that a
    shuffled or UID-named study is not called reversed). ``kept_idx`` are the kept slices' file-name ranks, in ``z``
    order."""
    z_by_name = z[np.argsort(kept_idx)]
    return bool(len(z) > 1 and np.mean(np.diff(z_by_name) < 0) >= 0.9)


def order_slices(infos: Sequence[SliceInfo]) -> SliceOrder:
    """Choose the study's slices and order them head to feet, from headers alone.

    The largest group of files sharing (SeriesInstanceUID, Rows, Columns) is the study; other files are
    skipped. Slices are ordered by ImagePositionPatient projected on the slice normal (the cross product of
    the ImageOrientationPatient cosines), so file names, InstanceNumber and reversed numbering do not
    matter. Slices at the same position are duplicates: the first in file-name order is kept. Without
    positions the order falls back to InstanceNumber, then to the numeric file name, with a warning.

    Parameters
    ----------
    infos : sequence of SliceInfo
        At least one.

    Returns
    -------
    SliceOrder
        ``z`` (n,) mm increasing toward the feet; ``dz`` the median z step (mm).
    """
    if not infos:
        raise ValueError("order_slices needs at least one slice")
    infos = sorted(infos, key=lambda s: natural_key(s.path.name))
    group, skipped = main_group(infos)
    orientation, normal, warns = series_normal(group)
    group, off_plane = drop_off_plane(group, normal)
    skipped += off_plane
    if abs(normal[2]) < 0.5:
        warns.append(f"slice normal {np.round(normal, 3).tolist()} is not head-feet: not an axial series")
    sign = -1.0 if normal[2] >= 0 else 1.0  # so that z grows toward the feet: patient +z (LPS) points to the head
    stated = next((t for t in (s.spacing_between or s.slice_thickness for s in group) if t), None)

    group, z_all, no_position, position_warns = z_from_positions(group, normal, sign)
    skipped += no_position
    warns += position_warns
    by_name = False
    if z_all is None:
        z_all, by_name, name_warns = z_from_names(group, stated or 1.0)
        warns += name_warns
        if stated is None:
            warns.append("no slice spacing in the headers: dz = 1.0 mm assumed")

    kept_idx, duplicates = drop_duplicates(group, z_all)
    skipped += duplicates
    z = np.asarray(z_all[kept_idx], dtype=np.float64)
    dz, spacing_warns = slice_spacing(z, stated)
    warns += spacing_warns
    return SliceOrder(kept=tuple(group[i] for i in kept_idx), z=z, dz=dz, orientation=orientation,
                      reversed=not by_name and name_order_reversed(z, kept_idx),
                      skipped=tuple(skipped), warnings=tuple(warns))
