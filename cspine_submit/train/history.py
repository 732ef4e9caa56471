"""A training run's history: one row per (fold, unit, epoch) in ``history.csv``, and its picture.

``history.csv`` columns: :data:`HISTORY_COLUMNS` (loss and AUC on the training crops, ``val_*`` on the inner split
when ``patience > 0``, the epoch's learning rate and seconds). Rows are appended after the epoch's checkpoint is on
disk, so a resumed run never repeats a logged epoch (:mod:`cspine_submit.train.fit`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from cspine_submit.files import atomic_write_text

HISTORY_COLUMNS = ("fold", "vertebra", "epoch", "loss", "auc", "val_loss", "val_auc", "lr", "seconds")


def read_history(path: str | Path) -> list[dict]:
    """Rows of history.csv as dicts of floats (fold and vertebra kept as str); [] when absent."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        d = {"fold": r.get("fold", ""), "vertebra": r["vertebra"]}
        for k in HISTORY_COLUMNS[2:]:
            try:
                d[k] = float(r[k])
            except (TypeError, ValueError, KeyError):
                d[k] = float("nan")
        d["epoch"] = int(d["epoch"])
        out.append(d)
    return out


def append_history(path: str | Path, row: dict) -> None:
    """Add one row to history.csv, rewriting the file atomically (a kill never leaves half a row)."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    if not text:
        w.writeheader()
    w.writerow({k: row.get(k, "") for k in HISTORY_COLUMNS})
    atomic_write_text(path, text + buf.getvalue())


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194)]
LEGEND_ENTRY_PX = 90
"""Width of one legend entry (colour swatch + unit name such as ``f4/all``)."""


def legend_note(history: Sequence[dict]) -> str:
    """The line style key, saying only what is drawn: validation lines exist only with an inner split."""
    has_val = any(np.isfinite(r.get(k, np.nan)) for r in history for k in ("val_loss", "val_auc"))
    if has_val:
        return "dashed: training crops   solid: inner validation split (--patience)"
    return "solid: training crops (no validation line: --patience 0 holds no study of a fold's training out)"


def _dashed(img, a, b, bgr) -> None:
    import cv2

    n = max(int(np.hypot(b[0] - a[0], b[1] - a[1]) // 6), 1)
    for s in range(0, n, 2):
        pa = (int(a[0] + (b[0] - a[0]) * s / n), int(a[1] + (b[1] - a[1]) * s / n))
        pb = (int(a[0] + (b[0] - a[0]) * (s + 1) / n), int(a[1] + (b[1] - a[1]) * (s + 1) / n))
        cv2.line(img, pa, pb, bgr, 1, cv2.LINE_AA)


def _panel(img, box, history, by_unit, *, keys, title, max_epoch, has_val) -> None:
    """One panel (loss or AUC): frame, ticks, and a line per unit and key."""
    import cv2

    x0, y0, x1, y1 = box
    vals = [r[k] for r in history for k in keys if np.isfinite(r.get(k, np.nan))]
    lo, hi = (0.0, 1.0) if title == "AUC" else (0.0, max(vals + [1e-3]) * 1.05)
    font, grey = cv2.FONT_HERSHEY_SIMPLEX, (80, 80, 80)
    cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
    cv2.putText(img, title, (x0 + 5, y0 - 10), font, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    for t in range(5):
        y = int(y1 - (y1 - y0) * t / 4)
        cv2.putText(img, f"{lo + (hi - lo) * t / 4:.2f}", (x0 - 45, y + 4), font, 0.4, grey, 1, cv2.LINE_AA)
        cv2.line(img, (x0, y), (x0 + 4, y), (0, 0, 0), 1)
    cv2.putText(img, f"epoch 1..{max_epoch}", (x0 + (x1 - x0) // 2 - 40, y1 + 18), font, 0.4, grey, 1, cv2.LINE_AA)

    def pt(e, v):
        fx = (e - 1) / max(max_epoch - 1, 1)
        fy = (v - lo) / (hi - lo) if hi > lo else 0.0
        return int(x0 + fx * (x1 - x0)), int(y1 - min(max(fy, 0.0), 1.0) * (y1 - y0))

    for i, rows in enumerate(by_unit.values()):
        bgr = _COLOURS[i % len(_COLOURS)][::-1]
        for key, dashed in ((keys[0], has_val), (keys[1], False)):
            pts = [pt(r["epoch"], r[key]) for r in rows if np.isfinite(r.get(key, np.nan))]
            for a, b in zip(pts, pts[1:]):
                _dashed(img, a, b, bgr) if dashed else cv2.line(img, a, b, bgr, 2, cv2.LINE_AA)
            for q in pts:
                cv2.circle(img, q, 2, bgr, -1)


def draw_history_png(history: Sequence[dict], path: str | Path, width: int = 900, height: int = 380) -> Path:
    """Loss and AUC per epoch, one colour per unit (e.g. ``f2/C5``), drawn with cv2; the legend wraps into as many
    rows as the units need (the picture grows) and its line key names only the lines drawn (:func:`legend_note`).
    """
    import cv2

    by_unit: dict[str, list[dict]] = {}
    for r in history:
        by_unit.setdefault(r["vertebra"], []).append(r)
    per_row = max((width - 60) // LEGEND_ENTRY_PX, 1)
    rows = max(-(-len(by_unit) // per_row), 1)
    img = np.full((height + 22 * (rows - 1), width, 3), 255, np.uint8)  # one legend row fits the default height
    max_epoch = max([r["epoch"] for r in history] + [1])
    has_val = "validation" in legend_note(history)
    pw = width // 2
    for p, (keys, title) in enumerate(((("loss", "val_loss"), "loss"), (("auc", "val_auc"), "AUC"))):
        _panel(img, (p * pw + 50, 30, p * pw + pw - 15, height - 60), history, by_unit, keys=keys, title=title,
               max_epoch=max_epoch, has_val=has_val)
    top = height - 27  # below the panels' "epoch" labels
    for i, unit in enumerate(by_unit):
        x, y = 50 + (i % per_row) * LEGEND_ENTRY_PX, top + 22 * (i // per_row)
        cv2.line(img, (x, y - 4), (x + 20, y - 4), _COLOURS[i % len(_COLOURS)][::-1], 2)
        cv2.putText(img, unit, (x + 24, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, legend_note(history), (50, top + 22 * rows - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1,
                cv2.LINE_AA)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    if not cv2.imwrite(str(tmp), img):
        raise OSError(f"{path}: could not write PNG")
    tmp.replace(path)
    return path
