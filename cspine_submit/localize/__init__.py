"""Slice ranges: learn them from segmentation masks, plan crops for a new study from its headers.

Axis convention: ``volume : (z, y, x)``, z from head to feet (index 0 = most cranial slice), positions ``z_mm``
in mm growing toward the feet (``StudyHeader.z``).

Three ways to put a learned vertebra range into a new study (``SliceRanges.method``), all learned at once:

``fraction``
    Start and end of each vertebra as a fraction of the study's z-extent (0 = first slice, 1 = last). Headers
    only. Breaks when a scan includes more or less head or chest than the training scans.
``mm_top``
    Start and end in mm below the first (most cranial) slice. Headers only. Right when every scan starts at the
    same anatomical level, wrong by exactly the difference otherwise.
``profile`` (the default with images)
    Start and end in mm relative to the centre of the cervical column (midway between the top of C1 and the
    bottom of C7), scaled by the column's length, with centre and length found in the new study by aligning a
    learned z profile of image features to the same features measured on a few evenly spaced slices
    (:func:`cue_indices`: at most ``cue.max_slices``, about one every ``cue.step_mm`` mm). The features
    (``column_cells``, :mod:`~cspine_submit.localize.features`) are mean HU in a grid of 15 mm cells around the
    column: they see the skull base, mandible, airway, first ribs and lung apices in mm around the spine, whatever
    the field of view or pixel size. Needs training studies with images; costs those few decoded slices per study
    at inference (about 37 on a competition-style neck CT).

The in-plane box is learned as mm offsets from the column's bone centroid (``mm_bone``, with a cue), from the image
centre (``mm_centre``) or as fractions of rows and columns (``fraction``); see ``plan.planned_box``.

One job a module, imports pointing down the list (no module imports one listed after it):

``features``
    Per-slice image features of the cue (column cells; the older whole-slice areas; bone centroids) and which
    slices to decode.
``masks``
    Mask file + study headers -> :class:`StudyTruth` (both layouts, the orientation checks, the mask-on-bone check).
``header_column``
    Header facts (z extent, slice spacing) -> the top of C1 and bottom of C7 by a least-squares fit, and each
    vertebra along that column: what the header-only ``fraction`` fallback plans with when the ranges carry it.
``align``
    Measured cue features + the learned template -> column centre, length scale and the alignment's cost; whether
    that cost is plausible next to the training studies' leave-one-out costs stored with the template.
``learn``
    StudyTruths -> :class:`~cspine_submit.config.SliceRanges` (extents, boxes, the profile template and its
    leave-one-out cost reference; JSON in).
``plan``
    Header + SliceRanges (+ the measured cue) -> ``{vertebra: CropPlan}``.
``evaluate``
    Plans vs truth -> coverage / purity / box coverage, leave-one-out.
``extents``
    A table of real masks' vertebra extents -> header-only truths, each vertebra's place along the column, and
    ranges whose z-extents follow the competition's masks (whole bone, overlapping neighbours).

Callers import from here (``from cspine_submit.localize import plan_crops``); the names below are the public face.
"""

from cspine_submit.localize.features import (
    BODY_HU,
    BONE_HU,
    DEFAULT_CUE,
    DEFAULT_FEATURE_SET,
    FEATURE_SETS,
    FEATURE_STRIDE,
    FEATURES,
    bone_centroids,
    column_cells,
    column_centre,
    column_point,
    cue_indices,
    measure_features,
    slice_features,
)
from cspine_submit.localize.masks import (
    MaskError,
    StudyTruth,
    check_mask_on_bone,
    extract_truth,
    load_truths,
    pair_masks,
    truth_from_files,
)
from cspine_submit.localize.align import (
    IMPLAUSIBLE_FACTOR,
    alignment_check,
    cost_reference,
    cost_threshold,
)
from cspine_submit.localize.learn import (
    DEFAULT_SCALES,
    METHODS,
    QUANTILES,
    TEMPLATE_STEP_MM,
    column_point_truth,
    learn_ranges,
    learn_template,
    load_ranges,
    loo_alignment_costs,
    ranges_from_truths,
    study_coordinates,
)
from cspine_submit.localize.plan import (
    BOX_MODES,
    DEFAULT_Z_MARGIN_MM,
    CropPlan,
    Cue,
    cue_features,
    cue_from_measurements,
    indices_in_range,
    match_profile,
    measure_cue,
    plan_crops,
    planned_box,
    planned_ranges_mm,
    plans_from_positions,
    snap_to_decoded,
    study_cue_indices,
)
from cspine_submit.localize.evaluate import evaluate_ranges, score_plans
from cspine_submit.localize.header_column import HEADER_FEATURES, column_mm, fit_header_column
from cspine_submit.localize.extents import (
    StudyExtents,
    column_extents,
    load_extents,
    truths_from_extents,
    with_real_extents,
)

__all__ = [
    # features
    "BODY_HU", "BONE_HU", "DEFAULT_CUE", "DEFAULT_FEATURE_SET", "FEATURE_SETS", "FEATURE_STRIDE", "FEATURES",
    "bone_centroids", "column_cells", "column_centre", "column_point", "cue_indices", "measure_features",
    "slice_features",
    # masks
    "MaskError", "StudyTruth", "check_mask_on_bone", "extract_truth", "load_truths", "pair_masks", "truth_from_files",
    # learn
    "DEFAULT_SCALES", "METHODS", "QUANTILES", "TEMPLATE_STEP_MM",
    "column_point_truth", "learn_ranges", "learn_template", "load_ranges", "loo_alignment_costs", "ranges_from_truths",
    "study_coordinates",
    # align
    "IMPLAUSIBLE_FACTOR", "alignment_check", "cost_reference", "cost_threshold",
    # plan
    "BOX_MODES", "DEFAULT_Z_MARGIN_MM", "CropPlan", "Cue", "cue_features", "cue_from_measurements", "indices_in_range",
    "match_profile", "measure_cue", "plan_crops", "planned_box", "planned_ranges_mm", "plans_from_positions", "snap_to_decoded",
    "study_cue_indices",
    # evaluate
    "evaluate_ranges", "score_plans",
    # header_column
    "HEADER_FEATURES", "column_mm", "fit_header_column",
    # extents
    "StudyExtents", "column_extents", "load_extents", "truths_from_extents", "with_real_extents",
]
