"""Seeded mutations of competition-like slices through every read route (issue 18): for every mutant, the fast and
pydicom header routes give the same fields or both refuse, and every decode route gives pydicom's HU or an error.

Seeds: 64 x 64 CT slices as the competition stores them (JPEG Lossless SV1 16-bit signed and 12-bit unsigned with
intercept -1024, encoded by GDCM; Explicit and Implicit VR Little Endian), plus the small CT and MR files shipped in
pydicom's wheel (pydicom's licence, MIT-style: read from the installed package, not copied). Mutations: byte flips in
the header and in the pixel data, overwritten 2-byte words (lengths, VRs, US values), text in the scanned values,
truncation, inserted and deleted bytes. ``CSPINE_FUZZ_N`` mutants (300 by default), checked in batches, each in a
fresh interpreter (:mod:`_decode_routes`): a decoder that crashes fails the test. ``CSPINE_FUZZ_SEED`` picks another
seed.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cspine_submit.read import dicom_header

import _decode_routes
from test_decode_safety import encode, run_routes, write_slice

N_MUTANTS = int(os.environ.get("CSPINE_FUZZ_N", "300"))
SEED = int(os.environ.get("CSPINE_FUZZ_SEED", "2022"))
BATCH = 100
TEXT = b"0123456789.-+eE\\ \x00aZ"


def seed_files(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 300, (64, 64)).clip(-1024, 2500).astype(np.int16)
    u12 = (hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
    seeds = [
        write_slice(folder / "jpeg_s16.dcm", 64, 64, frame=encode(hu, 16, 16)),
        write_slice(folder / "jpeg_u12.dcm", 64, 64, frame=encode(u12, 16, 12), bits_stored=12, signed=False),
        write_slice(folder / "explicit_u12.dcm", 64, 64, stored=u12, bits_stored=12, signed=False),
    ]
    implicit = write_slice(folder / "implicit_s16.dcm", 64, 64, stored=hu)
    import pydicom

    ds = pydicom.dcmread(implicit)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(implicit, implicit_vr=True, little_endian=True)
    seeds.append(implicit)
    try:
        from pydicom.data import get_testdata_file

        seeds += [Path(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm")]
    except Exception:  # noqa: BLE001 - a pydicom without its test files: the written seeds still run
        pass
    assert ExplicitVRLittleEndian  # (the written seeds' default syntax)
    return seeds


def _pixel_start(data: bytes) -> int:
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return at if at > 0 else len(data)


def _value_spans(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the scanned tags' values in an explicit or implicit little-endian file."""
    spans = []
    for tag, _vr in dicom_header.WANTED.values():
        key = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
        at = data.find(key, 132)
        if at < 0:
            continue
        explicit = data[at + 4:at + 6].isalpha()
        length = int.from_bytes(data[at + 6:at + 8] if explicit else data[at + 4:at + 8], "little")
        start = at + (8 if explicit else 8)
        if 0 < length < 64:
            spans.append((start, length))
    return spans


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random mutation of a file's bytes."""
    b = bytearray(data)
    pixel = _pixel_start(data)
    kind = rng.integers(8)
    if kind == 0:  # a flipped byte in the header
        i = int(rng.integers(128, max(pixel, 129)))
        b[i] ^= int(rng.integers(1, 256))
    elif kind == 1:  # flipped bytes in the pixel data / codestream
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(min(pixel, len(b) - 1), len(b)))
            b[i] ^= int(rng.integers(1, 256))
    elif kind == 2:  # an overwritten 2-byte word in the header (a length, a VR, a US value)
        i = int(rng.integers(128, max(pixel - 2, 129)))
        b[i:i + 2] = int(rng.integers(0, 65536)).to_bytes(2, "little")
    elif kind == 3:  # text in a scanned value
        spans = _value_spans(data)
        if spans:
            start, length = spans[int(rng.integers(len(spans)))]
            for _ in range(int(rng.integers(1, 3))):
                b[start + int(rng.integers(length))] = TEXT[int(rng.integers(len(TEXT)))]
    elif kind == 4:  # truncated
        del b[int(rng.integers(132, len(b))):]
    elif kind == 5:  # bytes inserted
        i = int(rng.integers(132, len(b)))
        b[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 5))).astype(np.uint8))
    elif kind == 6:  # bytes deleted
        i = int(rng.integers(132, len(b) - 4))
        del b[i:i + int(rng.integers(1, 5))]
    else:  # a Rows or Columns value changed (a 2-byte change of the frame's shape)
        for key in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00"):
            at = data.find(key, 132)
            if at > 0 and rng.random() < 0.7:
                off = at + 8
                b[off:off + 2] = int(rng.choice([1, 2, 32, 63, 65, 128, int(rng.integers(0, 65536))])).to_bytes(
                    2, "little")
    return bytes(b)


def test_mutants_agree_with_pydicom_on_every_route(tmp_path):
    pytest.importorskip("gdcm")
    seeds = seed_files(tmp_path)
    originals = [p.read_bytes() for p in seeds]
    rng = np.random.default_rng(SEED)
    mutants = []
    for k in range(N_MUTANTS):
        s = int(rng.integers(len(seeds)))
        path = tmp_path / f"m{k:05d}_{seeds[s].stem}.dcm"
        path.write_bytes(mutate(originals[s], rng))
        mutants.append(path)
    results = []
    for start in range(0, len(mutants), BATCH):
        results += run_routes(mutants[start:start + BATCH])
    assert len(results) == len(mutants)
    problems = {r["file"]: _decode_routes.bad(r) for r in results if _decode_routes.bad(r)}
    counts = Counter(r["header"] for r in results)
    counts.update(f"ref {r['ref']}" for r in results)
    counts.update(f"{name} {v.split(':')[0]}" for r in results for name, v in r["routes"].items())
    print(f"\n{len(mutants)} mutants (seed {SEED}):", dict(sorted(counts.items())))
    assert not problems, problems
