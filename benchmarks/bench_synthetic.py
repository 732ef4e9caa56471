"""How long the synthetic generator takes: rendering, writing (uncompressed / JPEG Lossless .4.70), the mask.

Usage::

    python benchmarks/bench_synthetic.py [--sizes 128 256 512] [--slices 300] [--out /tmp/bench_synth]

Prints one row per image size: slices, seconds per stage, slices per second, MB written. Also times the session
test fixture's dataset (tests/conftest.py SYNTH_PARAMS). Single process; the numbers depend on machine load.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cspine_submit.datasets.synthetic import StudySpec, generate_dataset, render_study, write_study, write_study_mask


def _mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


def bench_size(size: int, slices: int, out: Path) -> dict:
    # Fixed scan extent (30 mm above C1, 40 mm below C7) and a spacing chosen so the study has about `slices`.
    probe = render_study(StudySpec("1.2.826.0.1.3680043.1", seed=size, size=32, spacing=(1.0, 1.0),
                                   head=(30.0, 30.0), chest=(40.0, 40.0)))
    dz = round(probe.shape[0] / slices, 3)
    spec = StudySpec("1.2.826.0.1.3680043.2", seed=size, fractures=(("C2", "line"), ("C5", "wedge"), ("C6", "line")),
                     size=size, spacing=(dz, dz), head=(30.0, 30.0), chest=(40.0, 40.0), compressed=False)
    t0 = time.perf_counter()
    study = render_study(spec)
    t_render = time.perf_counter() - t0
    raw_dir = out / f"raw_{size}" / spec.uid
    t0 = time.perf_counter()
    write_study(study, raw_dir)
    t_raw = time.perf_counter() - t0
    study = dataclasses.replace(study, spec=dataclasses.replace(spec, compressed=True))
    jpeg_dir = out / f"jpeg_{size}" / spec.uid
    t0 = time.perf_counter()
    write_study(study, jpeg_dir)
    t_jpeg = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_study_mask(study, out / f"mask_{size}.nii")
    t_mask = time.perf_counter() - t0
    n = study.shape[0]
    return {
        "size": size,
        "slices": n,
        "render_s": t_render,
        "write_raw_s": t_raw,
        "write_jpeg_s": t_jpeg,
        "mask_s": t_mask,
        "total_jpeg_s": t_render + t_jpeg + t_mask,
        "jpeg_slices_per_s": n / t_jpeg,
        "raw_MB": _mb(raw_dir),
        "jpeg_MB": _mb(jpeg_dir),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--out", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_synth_"))
    try:
        rows = [bench_size(size, args.slices, out) for size in args.sizes]
        cols = ["size", "slices", "render_s", "write_raw_s", "write_jpeg_s", "mask_s", "total_jpeg_s",
                "jpeg_slices_per_s", "raw_MB", "jpeg_MB"]
        print(" | ".join(f"{c:>12}" for c in cols))
        for r in rows:
            print(" | ".join(f"{r[c]:>12.2f}" if isinstance(r[c], float) else f"{r[c]:>12}" for c in cols))

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import SYNTH_PARAMS

        t0 = time.perf_counter()
        ds = generate_dataset(out / "fixture", **SYNTH_PARAMS)
        dt = time.perf_counter() - t0
        print(f"\ntest fixture dataset ({len(ds.train)} train + {len(ds.test)} test studies, "
              f"{sum(r.n_slices for r in ds.studies)} slices of {SYNTH_PARAMS['size']} px): {dt:.2f} s")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
