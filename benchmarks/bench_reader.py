"""Reader throughput on a competition-like study: ~300 slices of 512x512 stored as JPEG Lossless SV1 (.4.70).

The study is written with GDCM (the only Python encoder for .4.70) from the real GE CT slice in
tests/data/dicom (shifted per slice, with CT-like noise so that compression behaves like real data).
Prints a table of slices/s for: the header scan, decoding every slice with each available plugin,
scan + decode of a planned subset of about 100 slices, a naive baseline (pydicom dcmread + pixel_array on
every file in file-name order), and the speed-up of iter_studies with 1 and 2 worker processes.

    python benchmarks/bench_reader.py [--slices 300] [--subset 100] [--studies 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from cspine_submit.dicom import available_plugins, compress_jpeg_lossless, read_slices, scan_study
from cspine_submit.reader import iter_studies

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "dicom"
REF = DATA / "transfer_syntaxes" / "CTImage_ref_implicitLE.dcm"


def write_study(folder: Path, n: int, seed: int = 0) -> Path:
    """n slices, file ``<k+1>.dcm`` = slice k from the head, .4.70 via GDCM."""
    folder.mkdir(parents=True)
    raw_dir = folder.parent / (folder.name + "_raw")
    raw_dir.mkdir()
    rng = np.random.default_rng(seed)
    template = pydicom.dcmread(REF)
    base = template.pixel_array.astype(np.int32)
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for k in range(n):
        ds = template.copy()
        shift = int(round(8 * np.sin(k / 25.0)))
        pixels = np.roll(base, shift, axis=0) + rng.normal(0, 8, base.shape).round().astype(np.int32)
        ds.PixelData = np.clip(pixels, -32768, 32767).astype(np.int16).tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-160.0, -160.0, 100.0 - 0.625 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        raw = raw_dir / f"{k + 1}.dcm"
        ds.save_as(raw, enforce_file_format=True)
        compress_jpeg_lossless(raw, folder / raw.name)
    shutil.rmtree(raw_dir)
    return folder


def naive(folder: Path) -> None:
    for path in sorted(folder.iterdir(), key=lambda p: int(p.stem)):
        ds = pydicom.dcmread(path)
        ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def planned_subset(folder: str, subset: int = 100) -> int:
    """What inference does per study: scan the headers, decode a planned contiguous block of slices."""
    header = scan_study(folder)
    start = max(0, header.n_slices // 2 - subset // 2)
    return int(read_slices(header, range(start, min(start + subset, header.n_slices))).shape[0])


def read_all(folder: str) -> int:
    header = scan_study(folder)
    return int(read_slices(header).shape[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--subset", type=int, default=100)
    parser.add_argument("--studies", type=int, default=4, help="studies streamed for the worker speed-up")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench_reader_"))
    try:
        t0 = time.perf_counter()
        study = write_study(tmp / "study", args.slices)
        size_mb = sum(p.stat().st_size for p in study.iterdir()) / 1e6
        print(f"wrote {args.slices} slices 512x512 .4.70 ({size_mb:.1f} MB) in {time.perf_counter() - t0:.1f} s\n")
        n = args.slices
        header = scan_study(study)
        assert header.n_slices == n and set(header.transfer_syntaxes) == {"1.2.840.10008.1.2.4.70"}
        cases = [("header scan (scan_study)", n, lambda: scan_study(study))]
        for plugin in available_plugins("1.2.840.10008.1.2.4.70"):
            cases.append((f"decode all, {plugin}", n, lambda plugin=plugin: read_slices(header, plugin=plugin)))
        cases += [
            ("decode all, default (preferred plugin)", n, lambda: read_slices(header)),
            (f"scan + decode planned {args.subset}", args.subset, lambda: planned_subset(str(study), args.subset)),
            ("naive: dcmread+pixel_array, all, name order", n, lambda: naive(study)),
        ]
        # Round robin over the cases, median per case: the machine is shared, so load changes over time
        # and must hit every case alike.
        times = {name: [] for name, _, _ in cases}
        for _ in range(args.repeat):
            for name, _, fn in cases:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        rows = [(name, count, statistics.median(times[name])) for name, count, _ in cases]

        print(f"{'measurement':<46}{'slices':>8}{'seconds':>10}{'slices/s':>10}{'ms/slice':>10}")
        for name, count, seconds in rows:
            print(f"{name:<46}{count:>8}{seconds:>10.2f}{count / seconds:>10.1f}{1000 * seconds / count:>10.2f}")
        naive_t = rows[-1][2]
        print(f"\nper study: scan + planned {args.subset} slices {rows[-2][2]:.2f} s vs naive read-all {naive_t:.2f} s "
              f"({naive_t / rows[-2][2]:.1f}x)")

        # Worker speed-up: the same study folder streamed several times (page cache warm for all runs).
        items = [str(study)] * args.studies
        print(f"\niter_studies over {args.studies} studies (scan + decode all {n} slices each):")
        print(f"{'workers':<10}{'seconds':>10}{'slices/s':>10}{'speed-up':>10}{'busy':>8}")
        base = None
        for workers in (0, 1, 2):
            start = time.perf_counter()
            outcomes = list(iter_studies(items, read_all, workers=workers, prefetch=4))
            seconds = time.perf_counter() - start
            assert all(o.ok and o.value == n for o in outcomes), [o.error for o in outcomes]
            base = base or seconds
            busy = sum(o.seconds for o in outcomes) / seconds
            print(f"{workers:<10}{seconds:>10.2f}{args.studies * n / seconds:>10.1f}{base / seconds:>10.2f}{busy:>8.2f}")
        print("(workers=0 runs in-process; pool times include spawning the workers; busy = summed per-study work\n"
              " time / wall time, i.e. how many studies were in progress at once on average)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
