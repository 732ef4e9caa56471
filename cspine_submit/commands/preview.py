"""Draw a study's crop plan: sagittal and coronal reformats in a bone window with each vertebra's planned range
(coloured band with its name), its crop box, the planned slices, and the mask outline when --mask is given; the
patient directions, a mm ruler and scale bar, and a key for the marks.

Built from a subset of the slices (--max-slices), so it takes seconds. Look at it to see at once whether the
learned ranges fit the study. With --weights DIR it plans as `submit --weights DIR` does: that folder's slice
ranges (or the package default when it has none) and its model_config.json. The slices printed are 0-based indices
into the study's slices sorted head to feet, with the DICOM file each one is.
"""

from __future__ import annotations

from pathlib import Path

from cspine_submit.files import default_weights_dir

NAME = "preview"
HELP = "PNG of a study's planned vertebra ranges and crop boxes (sagittal + coronal)"
ORDER = 32


def add_arguments(parser) -> None:
    parser.add_argument("study", type=Path, help="study folder of axial DICOM slices")
    parser.add_argument("--out", type=Path, default=Path("preview.png"), help="output PNG (default preview.png)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="plan as `submit --weights DIR` does: that folder's slice_ranges.json and "
                        "model_config.json (default: the package's weights/)")
    parser.add_argument("--ranges", type=Path, default=None,
                        help="slice_ranges.json to plan with instead (default: the weights folder's)")
    parser.add_argument("--config", type=Path, default=None,
                        help="model_config.json for K slices per vertebra instead (default: the weights folder's, "
                        "else defaults)")
    parser.add_argument("--mask", type=Path, default=None, help="segmentation mask of this study (.nii/.nii.gz)")
    parser.add_argument("--layout", choices=("competition", "affine"), default="competition",
                        help="orientation of --mask (default competition)")
    parser.add_argument("--max-slices", type=int, default=96, help="slices read for the reformats (default 96)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def _plan_inputs(args):
    """Ranges and config as a run with the same weights folder plans with (submit's own ``load_ranges_for``);
    ``--ranges`` / ``--config`` override. Returns ``(ranges, ranges_path, config, notes)``."""
    from cspine_submit.config import ModelConfig
    from cspine_submit.localize import load_ranges
    from cspine_submit.submit import load_ranges_for

    weights = args.weights or default_weights_dir()
    if args.weights is not None and not weights.is_dir():
        raise FileNotFoundError(f"{weights}: weights folder not found")
    notes = []
    if args.ranges is not None:
        ranges, ranges_path = load_ranges(args.ranges), args.ranges
    else:
        ranges, ranges_path, notes = load_ranges_for(weights)
    config_path = args.config or weights / "model_config.json"
    config = ModelConfig.from_json(config_path) if config_path.is_file() or args.config else ModelConfig()
    return ranges, ranges_path, config, notes


def _slice_span(indices, file_names) -> str:
    """``33-55 (0-based; files 34.dcm-56.dcm)``: a plan's slice indices with the DICOM files they are."""
    first, last = indices[0], indices[-1]
    files = f"; files {file_names[first]}-{file_names[last]}" if file_names else ""
    return f"{first}-{last} (0-based{files})"


def run(args) -> int:
    import cv2

    from cspine_submit.read.dicom import DicomReadError
    from cspine_submit.tools.preview import preview_study

    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; use --force to overwrite")
        return 2
    try:
        ranges, ranges_path, config, notes = _plan_inputs(args)
        image, geo, plans, info = preview_study(args.study, ranges, config, mask_path=args.mask,
                                                layout=args.layout, max_slices=args.max_slices)
    except (FileNotFoundError, ValueError, DicomReadError) as exc:
        print(f"error: {exc}")
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(args.out), image):
        print(f"error: could not write {args.out}")
        return 2
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {args.out} ({image.shape[1]}x{image.shape[0]} px) from {info['slices_read']} of "
          f"{info['n_slices']} slices, ranges {ranges_path} (method {info['method']})")
    alignment = info.get("alignment")
    if alignment is not None and alignment["cost"] is not None:
        ref = alignment["cost_reference"]
        judged = ("no reference in these ranges to judge it by" if ref is None else
                  f"training studies leave-one-out {ref['q50']:.2f} median, {ref['max']:.2f} max; implausible above "
                  f"{alignment['threshold']:.2f}")
        print(f"profile alignment cost {alignment['cost']:.2f} ({judged})")
        if alignment["warning"]:
            print(f"WARNING: {alignment['warning']}")
    print("slices: 0-based indices into the study's slices sorted head to feet, and the DICOM files they are")
    for v, p in plans.items():
        print(f"  {v}: slices {_slice_span(p.slice_indices, info.get('file_names'))}, {len(p.slice_indices)} "
              f"planned; box y {p.box[0]}-{p.box[2]} x {p.box[1]}-{p.box[3]} (pixels: rows, columns)")
    return 0
