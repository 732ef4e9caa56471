"""Header scan cost: the fast scan (cspine_submit.read.dicom_header) against pydicom's reader, per file and per study.

Studies: the 11 real necks of tests/data/real_neck written as competition-style 512 x 512 studies (half JPEG Lossless
.4.70, half Explicit VR Little Endian, signed and unsigned; ``cspine-submit write-study``), and synthetic 512 x 512
studies (``cspine_submit.tools.bench.make_studies``: three in four .4.70). Pass ``--necks``/``--synthetic`` to reuse folders
of study folders already written.

Prints, per study set, ms per file (median [min, max] over ``--repeat`` rounds, round robin so that the shared
machine's load hits all alike; the files are in the page cache, a warm-up round runs first) for:

- ``pydicom``: ``read_slice_header(path, fast=False)`` (``dcmread(stop_before_pixels, specific_tags)`` + Pixel Data
  check + SliceInfo), the route before;
- ``fast``: ``read_slice_header(path)``, the same SliceInfo through the fast scan;
- ``fast walk only``: ``dicom_header.scan_header`` alone (open, read, walk to Pixel Data);
- ``dicomsdl``: ``dicomsdl.open`` plus the bytes of the same 18 tags and the Pixel Data info, a comparison point
  (not a SliceInfo);
- ``open+read``: opening a file and reading its first 8 KB, the floor of any header read in Python.

Then ``scan_study`` seconds per study (all files read, slices ordered), pydicom route against fast route.

    python benchmarks/bench_scan.py [--necks DIR] [--synthetic DIR] [--n-synthetic 3] [--slices 250] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from cspine_submit.read import dicom_header
from cspine_submit.read.dicom import scan_study
from cspine_submit.read.slice_header import read_slice_header

ROOT = Path(__file__).resolve().parents[1]
TAGS = tuple(dicom_header.WANTED)


def _spread(values: list[float], unit: str = "ms", digits: int = 3) -> str:
    return (f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}] {unit}")


def _pydicom(path: Path) -> None:
    read_slice_header(path, fast=False)


def _fast(path: Path) -> None:
    read_slice_header(path, fast=True)


def _walk(path: Path) -> None:
    with open(path, "rb") as fp:
        dicom_header.scan_header(fp, os.fstat(fp.fileno()).st_size)


def _dicomsdl(path: Path) -> None:
    import dicomsdl

    ds = dicomsdl.open(str(path))
    for keyword in TAGS:
        ds.getDataElement(keyword).toBytes()
    ds.getPixelDataInfo()


def _open_read(path: Path) -> None:
    with open(path, "rb") as fp:
        os.fstat(fp.fileno())
        fp.read(8192)


METHODS = {"pydicom": _pydicom, "fast": _fast, "fast walk only": _walk, "dicomsdl": _dicomsdl,
           "open+read": _open_read}


def per_file(studies: list[list[Path]], repeat: int) -> dict[str, list[float]]:
    """ms per file of each method, one value per round (all files of all studies)."""
    n = sum(len(s) for s in studies)
    out: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(repeat + 1):
        for name, fn in METHODS.items():
            t0 = time.perf_counter()
            for files in studies:
                for path in files:
                    fn(path)
            if r:  # round 0 warms the page cache and the imports
                out[name].append((time.perf_counter() - t0) / n * 1e3)
    return out


def per_study(folders: list[Path], repeat: int) -> dict[str, list[float]]:
    """scan_study seconds per study (mean over the studies), one value per round, for each route."""
    out: dict[str, list[float]] = {"pydicom": [], "fast": []}
    for r in range(repeat + 1):
        for name in out:
            if name == "pydicom":
                os.environ[dicom_header.DISABLE_ENV] = "1"
            t0 = time.perf_counter()
            for folder in folders:
                scan_study(folder)
            os.environ.pop(dicom_header.DISABLE_ENV, None)
            if r:
                out[name].append((time.perf_counter() - t0) / len(folders))
    return out


def report(title: str, folders: list[Path], repeat: int) -> None:
    studies = [sorted(p for p in f.iterdir() if p.is_file()) for f in folders]
    n = sum(len(s) for s in studies)
    print(f"\n{title}: {len(folders)} studies, {n} files ({min(map(len, studies))}-{max(map(len, studies))} a study)")
    files = per_file(studies, repeat)
    base = statistics.median(files["pydicom"])
    for name, values in files.items():
        print(f"  {name:16s} {_spread(values)} per file   ({base / statistics.median(values):.1f}x cheaper than pydicom)")
    study = per_study(folders, repeat)
    slow, fast = statistics.median(study["pydicom"]), statistics.median(study["fast"])
    print(f"  scan_study pydicom {_spread(study['pydicom'], 's')} per study")
    print(f"  scan_study fast    {_spread(study['fast'], 's')} per study   ({slow / fast:.1f}x)")


def _get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--necks", type=Path, help="folder of real-neck study folders (default: write them, 512 px)")
    parser.add_argument("--synthetic", type=Path, help="folder of synthetic study folders (default: write them)")
    parser.add_argument("--n-synthetic", type=int, default=3, help="synthetic studies to write")
    parser.add_argument("--slices", type=int, default=250, help="slices of a synthetic study (about)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds")
    return parser


def main(argv=None) -> int:
    args = _get_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        necks = args.necks
        if necks is None:
            from cspine_submit.datasets.volume_study import write_studies

            write_studies(ROOT / "tests" / "data" / "real_neck", Path(tmp) / "necks", size=512, seed=0)
            necks = Path(tmp) / "necks" / "images"
        synthetic = args.synthetic
        if synthetic is None:
            from cspine_submit.tools.bench import make_studies

            synthetic = make_studies(Path(tmp) / "synthetic", args.n_synthetic, 512, args.slices)[0].parent
        print("ms per file: median [min, max] over rounds; machine load varies, compare within a row set")
        report("real necks, 512 px (half .4.70, half Explicit VR LE)", sorted(p for p in necks.iterdir()
                                                                            if p.is_dir()), args.repeat)
        report("synthetic, 512 px (3 in 4 .4.70)", sorted(p for p in synthetic.iterdir() if p.is_dir()), args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
