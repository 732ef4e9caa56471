"""Summarise one study folder: slice order (head to feet), z positions and spacing, shape, transfer
syntaxes, whether file-name order ran feet to head, files left out and why, and the HU range; the text also lists
what is odd about the geometry (series kept, repeated positions, first file number, drifting in-plane position,
irregular steps, a short study).

With --json the output has exactly the keys study_uid, n_slices, files, z, spacing, shape,
transfer_syntaxes, reversed, skipped, hu (hu is null with --no-pixels).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

NAME = "inspect"
HELP = "summarise a study folder (order, spacing, transfer syntaxes, skipped files, HU range)"
ORDER = 80


def add_arguments(parser) -> None:
    parser.add_argument("study_dir", type=Path, metavar="STUDY_DIR", help="one study folder of DICOM slices")
    parser.add_argument("--json", action="store_true", help="print JSON with a fixed set of keys")
    parser.add_argument("--no-pixels", action="store_true", help="headers only: do not decode, no HU statistics")


def hu_stats(header, chunk: int = 32, progress: bool = False) -> dict:
    """min, max and mean HU over every slice, decoded ``chunk`` slices at a time (memory stays small)."""
    import numpy as np

    from cspine_submit.read.dicom import read_slices

    lo, hi, total, count = np.inf, -np.inf, 0.0, 0
    starts = range(0, header.n_slices, chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="decode", unit="chunk", file=sys.stderr)
    for start in starts:
        block = read_slices(header, range(start, min(start + chunk, header.n_slices)))
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
        total += float(block.sum(dtype=np.float64))
        count += block.size
    return {"min": lo, "max": hi, "mean": total / count}


def summary(header, hu: dict | None) -> dict:
    """The ``--json`` document for a scanned study."""
    return {
        "study_uid": header.study_uid,
        "n_slices": header.n_slices,
        "files": [p.name for p in header.files],
        "z": [round(float(z), 4) for z in header.z],
        "spacing": [float(s) for s in header.spacing],
        "shape": list(header.shape),
        "transfer_syntaxes": dict(Counter(header.transfer_syntaxes)),
        "reversed": bool(header.reversed),
        "skipped": [{"file": name, "reason": reason} for name, reason in header.skipped],
        "hu": hu,
    }


def geometry_findings(header) -> list[str]:
    """What is unusual about a study's geometry, one line each (empty for a plain study): the series kept over
    others, files left out as repeated positions, the file numbers, the in-plane position drifting from slice to
    slice (gantry tilt), irregular steps, and how long the study is. Headers only."""
    import numpy as np

    out = []
    other = [r for _, r in header.skipped if r.startswith("other series")]
    if other:
        out.append(f"series {header.series_uid or '(empty)'} kept; {len(other)} file(s) of other series left out")
    dups = sum(r.startswith("duplicate position") for _, r in header.skipped)
    if dups:
        out.append(f"{dups} file(s) repeat another file's position: one slice kept per position")
    numbers = [int(p.stem) for p in header.files if p.stem.isdigit()]
    if numbers and min(numbers) != 1:
        out.append(f"files numbered {min(numbers)}-{max(numbers)} (not from 1)")
    pos = np.asarray(header.positions, dtype=float)
    if pos.ndim == 2 and len(pos) > 1 and np.isfinite(pos).all():
        drift = np.ptp(pos[:, :2], axis=0)
        if (drift > 0.01).any():
            out.append(f"in-plane position drifts by {drift[0]:.1f} mm in x and {drift[1]:.1f} mm in y over the "
                       "study (gantry tilt): planned with each slice's own z")
    if header.n_slices > 1:
        steps = np.diff(header.z)
        if np.ptp(steps) > 0.1 * header.spacing[0] + 0.01:
            out.append(f"irregular steps {steps.min():.3f}-{steps.max():.3f} mm (median {header.spacing[0]:.3f}): "
                       "planned with each slice's own z")
        extent = float(header.z[-1] - header.z[0])
        if extent < 120.0:
            out.append(f"short: {extent:.1f} mm head to feet (a cervical column is 97-151 mm in the real masks)")
    return out


def format_text(header, doc: dict) -> str:
    z = doc["z"]
    lines = [
        f"study      {doc['study_uid']}  ({header.folder})",
        f"slices     {doc['n_slices']}  shape (z, y, x) {tuple(doc['shape'])}",
        f"spacing    dz {doc['spacing'][0]:.3f} mm (from positions; SliceThickness says "
        f"{header.slice_thickness if header.slice_thickness is not None else 'nothing'}), "
        f"dy {doc['spacing'][1]:.4f} mm, dx {doc['spacing'][2]:.4f} mm",
        f"z          {z[0]:.2f} .. {z[-1]:.2f} mm head to feet" if z else "z          -",
        f"order      head {doc['files'][0]} ... feet {doc['files'][-1]}"
        + ("  (file-name order ran feet to head: reversed)" if doc["reversed"] else ""),
        "syntaxes   " + ", ".join(f"{uid} x{n}" for uid, n in doc["transfer_syntaxes"].items()),
    ]
    if doc["hu"] is not None:
        hu = doc["hu"]
        lines.append(f"HU         min {hu['min']:.0f}, max {hu['max']:.0f}, mean {hu['mean']:.1f}")
    findings = geometry_findings(header)
    if findings:
        lines.append("geometry")
        lines += [f"  {f}" for f in findings]
    lines.append(f"skipped    {len(doc['skipped'])}")
    lines += [f"  {s['file']}: {s['reason']}" for s in doc["skipped"]]
    if header.warnings:
        lines.append("warnings")
        lines += [f"  {w}" for w in header.warnings]
    return "\n".join(lines)


def run(args) -> int:
    from cspine_submit.read.dicom import DicomReadError, scan_study

    try:
        header = scan_study(args.study_dir)
        hu = None if args.no_pixels else hu_stats(header, progress=not args.json and sys.stderr.isatty())
    except DicomReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    doc = summary(header, hu)
    print(json.dumps(doc, indent=2) if args.json else format_text(header, doc))
    return 0
