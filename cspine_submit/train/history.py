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


def draw_history_png(history: Sequence[dict], path: str | Path, width: int = 900, height: int = 380) -> Path:
    """Loss and AUC per epoch, one colour per vertebra (train dashed, validation solid), drawn with cv2."""
    import cv2

    img = np.full((height, width, 3), 255, np.uint8)
    panels = [("loss", "val_loss", "loss"), ("auc", "val_auc", "AUC")]
    pw = width // 2
    by_v: dict[str, list[dict]] = {}
    for r in history:
        by_v.setdefault(r["vertebra"], []).append(r)
    max_epoch = max([r["epoch"] for r in history] + [1])
    for p, (tk, vk, title) in enumerate(panels):
        x0, y0, x1, y1 = p * pw + 50, 30, p * pw + pw - 15, height - 60
        vals = [r[k] for r in history for k in (tk, vk) if np.isfinite(r.get(k, np.nan))]
        lo, hi = (0.0, 1.0) if title == "AUC" else (0.0, max(vals + [1e-3]) * 1.05)
        cv2.rectangle(img, (x0, y0), (x1, y1), (0, 0, 0), 1)
        cv2.putText(img, title, (x0 + 5, y0 - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        for t in range(5):
            v = lo + (hi - lo) * t / 4
            y = int(y1 - (y1 - y0) * t / 4)
            cv2.putText(img, f"{v:.2f}", (x0 - 45, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
            cv2.line(img, (x0, y), (x0 + 4, y), (0, 0, 0), 1)
        cv2.putText(img, f"epoch 1..{max_epoch}", (x0 + (x1 - x0) // 2 - 40, y1 + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (80, 80, 80), 1, cv2.LINE_AA)

        def pt(e, v):
            fx = (e - 1) / max(max_epoch - 1, 1)
            fy = (v - lo) / (hi - lo) if hi > lo else 0.0
            return int(x0 + fx * (x1 - x0)), int(y1 - min(max(fy, 0.0), 1.0) * (y1 - y0))

        for i, v in enumerate(by_v):
            rows = by_v[v]
            bgr = _COLOURS[i % len(_COLOURS)][::-1]
            for key, dashed in ((tk, True), (vk, False)):
                pts = [pt(r["epoch"], r[key]) for r in rows if np.isfinite(r.get(key, np.nan))]
                for a, b in zip(pts, pts[1:]):
                    if dashed:
                        n = max(int(np.hypot(b[0] - a[0], b[1] - a[1]) // 6), 1)
                        for s in range(0, n, 2):
                            pa = (int(a[0] + (b[0] - a[0]) * s / n), int(a[1] + (b[1] - a[1]) * s / n))
                            pb = (int(a[0] + (b[0] - a[0]) * (s + 1) / n), int(a[1] + (b[1] - a[1]) * (s + 1) / n))
                            cv2.line(img, pa, pb, bgr, 1, cv2.LINE_AA)
                    else:
                        cv2.line(img, a, b, bgr, 2, cv2.LINE_AA)
                for q in pts:
                    cv2.circle(img, q, 2, bgr, -1)
    for i, v in enumerate(by_v):
        x = 50 + i * 80
        cv2.line(img, (x, height - 22), (x + 20, height - 22), _COLOURS[i % len(_COLOURS)][::-1], 2)
        cv2.putText(img, v, (x + 24, height - 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "dashed: train  solid: validation", (50 + len(by_v) * 80, height - 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                (80, 80, 80), 1, cv2.LINE_AA)
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    if not cv2.imwrite(str(tmp), img):
        raise OSError(f"{path}: could not write PNG")
    tmp.replace(path)
    return path
