"""Build the Kaggle dataset folder for the no-internet submission kernel, and validate kernel-metadata.json.

The folder holds the package, make_submission.py, the weights folder to ship (--weights DIR, as weights/; verified
against its MANIFEST.json; refused when it holds no classifier unless --allow-untrained), decoder wheels for the
target Python (pip download --only-binary=:all: --no-deps; TensorFlow is not bundled, Kaggle's image has it),
dataset-metadata.json, and the kernel: kernel-metadata.json with the notebook cspine-submit-kernel.ipynb, both with
ids for --owner. Upload it with `kaggle datasets create -p DIR --dir-mode zip` (or `version`; without --dir-mode
the Kaggle CLI skips every sub-folder: the package, weights/ and wheels/), then push the kernel with
`kaggle kernels push -p DIR`. `--check-only` validates kernel-metadata.json the way Kaggle's CLI does.
"""

from __future__ import annotations

from pathlib import Path

NAME = "bundle"
HELP = "build the Kaggle dataset folder (package, weights, offline wheels, metadata); validate kernel-metadata.json"
ORDER = 70


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, help="dataset folder to write (required unless --check-only)")
    parser.add_argument("--weights", type=Path, help="weights folder to ship as weights/ (e.g. train's --out, or "
                        "weights/demo; default: weights/ beside the package, which holds no classifiers)")
    parser.add_argument("--owner", help="your Kaggle user name, for the dataset and kernel ids (default: "
                        "$KAGGLE_USERNAME)")
    parser.add_argument("--allow-untrained", action="store_true", help="ship a weights folder without classifiers "
                        "(the kernel then writes prior probabilities only)")
    parser.add_argument("--python-version", help="target Python for the wheels, e.g. 3.11 (default: this one)")
    parser.add_argument("--platform", action="append", help="wheel platform tag (repeatable; default: manylinux "
                        "x86-64 tags up to manylinux_2_28)")
    parser.add_argument("--no-wheels", action="store_true", help="do not download wheels (the kernel then needs "
                        "the decoders in Kaggle's image)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--check-only", action="store_true", help="only validate kernel-metadata.json")
    parser.add_argument("--kernel-metadata", type=Path, help="kernel-metadata.json to validate (default: the repo's)")


def _print_shipped(result) -> None:
    """What the bundle ships: the weights, the parts' sizes, what was left out, the notes."""
    from cspine_submit.manifest import format_bytes

    sizes = result.sizes
    print(f"wrote {result.out}: dataset {result.dataset_id}, kernel {result.kernel_id}")
    print(f"  weights: {result.weights.describe()}")
    print(f"  sizes: package {format_bytes(sizes['package'])}, weights {format_bytes(sizes['weights'])}, wheels "
          f"{format_bytes(sizes['wheels'])}, other {format_bytes(sizes['other'])}; upload "
          f"{format_bytes(sizes['total'])} before zipping")
    if result.left_out:
        print(f"  left out {len(result.left_out)} training artefact(s) found in the weights folder (not needed for "
              f"inference): {', '.join(result.left_out[:5])}{' ...' if len(result.left_out) > 5 else ''}")
    for w in result.wheels:
        print(f"  wheel {w.name}")
    for note in result.notes:
        print(f"warning: {note}")
    for note in result.wheel_errors:
        print(f"warning: {note}")


def run(args) -> int:
    from cspine_submit.files import repo_root
    from cspine_submit.tools import bundle

    kernel_path = args.kernel_metadata or repo_root() / "kernel-metadata.json"
    if args.check_only:
        validation = bundle.validate_kernel_metadata(kernel_path)
        for w in validation.warnings:
            print(f"warning: {kernel_path}: {w}")
        for e in validation.errors:
            print(f"error: {kernel_path}: {e}")
        print(f"{kernel_path}: {'valid' if validation.ok else 'INVALID'}")
        return 0 if validation.ok else 1
    if args.out is None:
        print("error: --out DIR is required (or use --check-only)")
        return 2
    try:
        result = bundle.build_bundle(
            args.out, weights=args.weights, owner=args.owner, allow_untrained=args.allow_untrained,
            python_version=args.python_version, platforms=tuple(args.platform or bundle.DEFAULT_PLATFORMS),
            wheels=not args.no_wheels, force=args.force,
        )
    except (FileExistsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 2
    _print_shipped(result)
    # --dir-mode: the Kaggle CLI's default ("skip") uploads top-level files only, i.e. neither the package nor
    # weights/ nor wheels/.
    print(f"next: kaggle datasets create -p {result.out} --dir-mode zip   "
          f"(a new version later: kaggle datasets version -p {result.out} --dir-mode zip -m MESSAGE)\n"
          f"then: kaggle kernels push -p {result.out}   (pushes {bundle.NOTEBOOK_FILE}; it attaches "
          f"{result.dataset_id} and the competition, GPU on, internet off)")
    return 1 if result.wheel_errors and not any(result.wheels) else 0
