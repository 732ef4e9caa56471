"""How the competition's studies are cut and labelled, as tables and draws (pure; no IO, no files at run time).

The numbers come from the real tables in ``tests/data/real_competition`` (README there; derived from public copies
of the RSNA 2022 training metadata: the header geometry of all 2019 training studies, the per-vertebra extents of
58 of the 87 segmentation masks) and from ../shared/FACTS.md ("The real training data, measured"); a test checks
that the constants below equal what those tables give. The synthetic generator (``scheme="real"``) and
``write-study``'s cut draw from them:

- slice spacing and SliceThickness together (:func:`draw_spacing`): one of the 2019 studies' (spacing, thickness)
  pairs, resampled (median spacing 0.625 mm, 26 % below 0.5 mm; thickness above the spacing in 43 %);
- the scan above the top of C1 and below the bottom of C7 together (:func:`draw_margins`): one of the 58 masks'
  pairs (median 37.5 / 35 mm, 5-71 / 0-107 mm); drawn apart from the spacing (their correlation, 0.35 between the
  spacing and the margin above C1, is not kept);
- the pixel spacing (:func:`draw_pixel_spacing`): only a summary is public (median 0.312, p25 0.2715, p75 0.3547,
  min 0.190, max 0.713 mm), so a log-normal fit to its median and quartiles (sigma 0.198), clipped to the range;
- the image size (:func:`draw_size`): 512 x 512 in 2017 of 2019 studies, 768 x 768 in 2 (the one 512 x 519 study
  counts as 512: the generator writes square images);
- which vertebrae are fractured (:func:`draw_fractured`): a documented model matching the real labels' counts per
  study (1058 / 623 / 239 / 64 / 26 / 7 / 2 studies with 0-6 fractured vertebrae), each vertebra's prevalence and
  the known neighbour co-occurrences (C1-C2 in 56 studies, C5-C6 90, C6-C7 130): given the count m, a set S of m
  vertebrae has probability proportional to ``exp(sum_{j in S} LOG_WEIGHT[j] + sum_{adjacent pairs in S}
  PAIR_BOND[pair])``, fitted by least squares to those numbers (the three unknown pairs share the known pairs'
  mean bond). It gives P(C2 | C1) 0.38, P(C6 | C5) 0.56, P(C7 | C6) 0.47, as the real labels do;
- numbering direction: 197 of 2019 studies (9.8 %) run feet to head (:data:`REVERSED_SHARE`);
- fracture boxes: 235 of the 961 fractured studies (24.5 %) have them, one box per boxed slice
  (:data:`BOXED_SHARE`).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from cspine_submit.config import VERTEBRAE

N_STUDIES: int = 2019
"""Training studies the tables describe."""

SPACING_THICKNESS: tuple[tuple[float, float, int], ...] = (
    (0.625, 0.625, 869), (1.0, 1.0, 269), (0.8, 1.0, 218), (0.4, 0.5, 175), (0.4, 0.6, 144),
    (0.5, 1.0, 111), (0.3125, 0.625, 109), (0.45, 0.625, 26), (0.45, 0.9, 24), (0.313, 0.625, 22),
    (0.312, 0.625, 15), (0.7, 1.0, 13), (0.33, 0.67, 5), (0.9, 1.0, 3), (0.4, 0.8, 3),
    (0.35, 0.6, 1), (0.5, 0.6, 1), (0.5, 0.5, 1), (0.6, 0.8, 1), (0.5, 0.75, 1),
    (0.7, 0.75, 1), (0.6, 1.0, 1), (0.5567, 0.6, 1), (0.78, 1.0, 1), (0.8748, 0.6641, 1),
    (0.962, 1.0, 1), (0.9637, 1.0, 1), (2.626, 0.4883, 1),
)
"""(spacing mm, SliceThickness mm, studies): every (median spacing, thickness) pair of the 2019 training studies."""

MARGINS_MM: tuple[tuple[float, float], ...] = (
    (32.5, 57.5), (47.0, 21.0), (41.25, 22.5), (30.0, 0.0), (28.0, 33.0), (44.8, 38.4),
    (42.5, 31.25), (43.5, 46.0), (47.5, 38.5), (33.75, 46.25), (65.1, 49.7), (37.5, 30.0),
    (22.5, 43.5), (43.0, 21.0), (22.5, 22.5), (40.0, 7.2), (26.25, 45.0), (59.0, 57.5),
    (31.0, 71.0), (27.6, 88.4), (37.5, 12.5), (26.25, 42.5), (70.0, 107.1), (61.25, 35.0),
    (21.25, 71.25), (15.0, 32.5), (54.8, 36.4), (23.125, 21.875), (22.5, 35.0), (16.4, 86.4),
    (40.0, 54.8), (22.5, 23.75), (50.0, 31.0), (37.5, 18.75), (65.0, 40.0), (57.5, 52.5),
    (42.0, 45.0), (17.5, 8.75), (26.25, 26.25), (26.25, 16.25), (44.0, 35.2), (71.2, 69.6),
    (15.0, 43.75), (5.0, 41.0), (18.8, 91.2), (29.6, 60.0), (40.0, 32.8), (41.0, 22.5),
    (31.5, 49.0), (51.2, 37.6), (25.0, 17.5), (59.0, 6.0), (26.25, 33.75), (60.0, 9.0),
    (26.25, 18.75), (61.0, 52.0), (65.1, 33.6), (28.0, 10.0),
)
"""(mm from the first slice to the top of C1, mm from the bottom of C7 to the last slice) of the 58 masked studies
of ``vertebra_extents.csv`` (whole bone, as the competition's masks label it)."""

PIXEL_SPACING_MEDIAN_MM: float = 0.312
PIXEL_SPACING_SIGMA: float = 0.198
"""Log-normal fit of the real pixel spacing: ``(ln 0.3547 - ln 0.2715) / 1.349`` from its quartiles."""
PIXEL_SPACING_RANGE_MM: tuple[float, float] = (0.190, 0.713)

REAL_MATRIX: int = 512
"""Rows = columns of almost every real study: the real field of view is the pixel spacing times this."""

SIZE_COUNTS: tuple[tuple[int, int], ...] = ((512, 2017), (768, 2))
"""(rows = columns, studies)."""

REVERSED_SHARE: float = 197 / N_STUDIES
"""Share of studies numbered feet to head."""

BOXED_SHARE: float = 235 / 961
"""Share of fractured studies with fracture boxes in train_bounding_boxes.csv (one box per boxed slice)."""

FRACTURED_COUNTS: tuple[int, ...] = (1058, 623, 239, 64, 26, 7, 2)
"""Studies with 0, 1, ..., 6 fractured vertebrae (none has all 7)."""

LOG_WEIGHT: tuple[float, ...] = (-8.321, -7.499, -9.469, -8.767, -8.75, -8.104, -7.161)
"""Per vertebra (C1 ... C7) log weight of the label model (see the module's docstring)."""

PAIR_BOND: tuple[float, ...] = (1.832, 2.178, 2.178, 2.178, 2.738, 1.963)
"""Per adjacent pair (C1-C2 ... C6-C7) log bond of the label model; C2-C3, C3-C4, C4-C5 share the mean of the
three known pairs' bonds."""


def _choice(rng: np.random.Generator, weights) -> int:
    w = np.asarray(weights, dtype=float)
    return int(rng.choice(len(w), p=w / w.sum()))


def draw_spacing(rng: np.random.Generator) -> tuple[float, float]:
    """(slice spacing, SliceThickness) in mm of one real study, resampled from :data:`SPACING_THICKNESS`."""
    dz, thk, _ = SPACING_THICKNESS[_choice(rng, [n for _, _, n in SPACING_THICKNESS])]
    return float(dz), float(thk)


def draw_margins(rng: np.random.Generator) -> tuple[float, float]:
    """(scan above the top of C1, scan below the bottom of C7) in mm of one real masked study."""
    head, chest = MARGINS_MM[int(rng.integers(len(MARGINS_MM)))]
    return float(head), float(chest)


def draw_pixel_spacing(rng: np.random.Generator) -> float:
    """In-plane pixel spacing, mm: the log-normal fit, clipped to the real range."""
    value = PIXEL_SPACING_MEDIAN_MM * math.exp(PIXEL_SPACING_SIGMA * float(rng.standard_normal()))
    return float(np.clip(value, *PIXEL_SPACING_RANGE_MM))


def draw_size(rng: np.random.Generator) -> int:
    """Rows = columns of one real study."""
    return int(SIZE_COUNTS[_choice(rng, [n for _, n in SIZE_COUNTS])][0])


def _label_sets() -> dict[int, tuple[list[tuple[int, ...]], np.ndarray]]:
    """Per count m: the m-subsets of the 7 vertebrae and their probabilities under the label model."""
    out = {}
    for m in range(1, len(VERTEBRAE)):
        sets = list(itertools.combinations(range(len(VERTEBRAE)), m))
        logp = np.array([sum(LOG_WEIGHT[j] for j in s) + sum(PAIR_BOND[j] for j in s if j + 1 in s) for s in sets])
        p = np.exp(logp - logp.max())
        out[m] = (sets, p / p.sum())
    return out


_LABEL_SETS = _label_sets()


def label_set_probabilities() -> dict[tuple[str, ...], float]:
    """The label model's probability of every set of fractured vertebrae (the empty set included); sums to 1."""
    total = sum(FRACTURED_COUNTS)
    out: dict[tuple[str, ...], float] = {(): FRACTURED_COUNTS[0] / total}
    for m, (sets, p) in _LABEL_SETS.items():
        for s, q in zip(sets, p):
            out[tuple(VERTEBRAE[j] for j in s)] = FRACTURED_COUNTS[m] / total * float(q)
    return out


def draw_fractured(rng: np.random.Generator) -> tuple[str, ...]:
    """The fractured vertebrae of one study under the label model (head to feet; empty for a negative study)."""
    m = _choice(rng, FRACTURED_COUNTS)
    if m == 0:
        return ()
    sets, p = _LABEL_SETS[m]
    return tuple(VERTEBRAE[j] for j in sets[int(rng.choice(len(sets), p=p))])
