"""How long writing the real necks as competition-style studies takes, stage by stage, and how much disk it needs.

Usage::

    python benchmarks/bench_real_studies.py [--src tests/data/real_neck] [--size 512] [--slice-mm 1.25] [--out DIR]

Per volume: loading (NIfTI -> axial), the competition cut's resampling (HU trilinear + labels nearest), writing the
DICOM files uncompressed and as JPEG Lossless .4.70, the mask; slices and MB. Then the totals, and the run of
``write_studies`` over the whole folder (half the studies JPEG Lossless) as ``cspine-submit write-study`` does it.
Single process; the numbers depend on machine load.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cspine_submit.datasets.dicom_writer import write_dicom_series, write_mask
from cspine_submit.datasets.volume_cut import competition_cut, resample_volume
from cspine_submit.datasets.volume_study import find_volumes, load_pair, stored_hu, write_studies


def _mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/real_neck")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slice-mm", type=float, default=1.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_real_"))
    rows = []
    print(f"{'name':<8}{'slices':>7}{'load s':>8}{'cut s':>7}{'raw s':>7}{'jpeg s':>8}{'mask s':>8}"
          f"{'raw MB':>8}{'jpeg MB':>8}")
    for name, ct_path, lab_path in find_volumes(args.src):
        t0 = time.perf_counter()
        ct, labels = load_pair(ct_path, lab_path)
        t1 = time.perf_counter()
        spec = competition_cut(labels.volume, labels.spacing, np.random.default_rng(args.seed), size=args.size,
                               slice_mm=args.slice_mm)
        hu, lab, spacing = resample_volume(ct.volume, ct.spacing, spec, labels.volume)
        hu = stored_hu(hu, signed=True)
        t2 = time.perf_counter()
        times = {}
        for kind, compressed in (("raw", False), ("jpeg", True)):
            s = time.perf_counter()
            write_dicom_series(out / kind / name, hu, study_uid="1.2.3", series_uid="1.2.3.1", spacing=spacing,
                               z_head=0.0, origin_xy=(0.0, 0.0), reversed_=False, compressed=compressed, signed=True,
                               modality=True)
            times[kind] = time.perf_counter() - s
        s = time.perf_counter()
        write_mask(out / "mask" / f"{name}.nii", lab, spacing, 0.0, (0.0, 0.0))
        t_mask = time.perf_counter() - s
        row = dict(name=name, slices=hu.shape[0], load=t1 - t0, cut=t2 - t1, raw=times["raw"], jpeg=times["jpeg"],
                   mask=t_mask, raw_mb=_mb(out / "raw" / name), jpeg_mb=_mb(out / "jpeg" / name))
        rows.append(row)
        print(f"{name:<8}{row['slices']:>7}{row['load']:>8.2f}{row['cut']:>7.2f}{row['raw']:>7.2f}{row['jpeg']:>8.2f}"
              f"{row['mask']:>8.2f}{row['raw_mb']:>8.1f}{row['jpeg_mb']:>8.1f}")
    total = {k: sum(r[k] for r in rows) for k in ("slices", "load", "cut", "raw", "jpeg", "mask", "raw_mb", "jpeg_mb")}
    print(f"{'total':<8}{total['slices']:>7}{total['load']:>8.2f}{total['cut']:>7.2f}{total['raw']:>7.2f}"
          f"{total['jpeg']:>8.2f}{total['mask']:>8.2f}{total['raw_mb']:>8.1f}{total['jpeg_mb']:>8.1f}")
    print(f"per slice: cut {1e3 * total['cut'] / total['slices']:.1f} ms, raw write "
          f"{1e3 * total['raw'] / total['slices']:.1f} ms, JPEG Lossless write {1e3 * total['jpeg'] / total['slices']:.1f} ms")

    dataset = out / "dataset"
    s = time.perf_counter()
    records = write_studies(args.src, dataset, size=args.size, slice_mm=args.slice_mm, seed=args.seed, force=True)
    elapsed = time.perf_counter() - s
    print(f"write_studies: {len(records)} studies, {sum(r['n_slices'] for r in records)} slices at "
          f"{args.size}x{args.size}, {args.slice_mm} mm: {elapsed:.1f} s, {_mb(dataset):.0f} MB "
          f"(images {_mb(dataset / 'images'):.0f} MB, masks {_mb(dataset / 'segmentations'):.0f} MB)")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
