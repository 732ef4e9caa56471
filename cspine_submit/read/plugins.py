"""Decoder plugin tables: which pydicom decoding plugin serves which transfer syntax here, and what to install.

pydicom's plugin system (``pydicom.pixels``) is the reference decoder and the fallback of every direct route
(:mod:`cspine_submit.read.pixels`). This module says, for each transfer syntax the competition's files may use, which
plugins are available in this environment and in which order the reader tries them (:func:`available_plugins`,
:data:`PREFERRED_PLUGINS`), and words a start-up failure as one message listing every missing package
(:func:`missing_decoders`, with pip names: :func:`install_hint`).
"""

from __future__ import annotations

import re
from typing import Iterable

from cspine_submit.read import pixels

COMPETITION_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1: the competition's compressed slices
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
"""Transfer syntaxes the reader is expected to meet, listed by ``cspine-submit env``."""

PREFERRED_PLUGINS: dict[str, tuple[str, ...]] = {
    # Measured on one core (benchmarks/bench_reader.py, 512x512 CT slices): GDCM decodes .4.70 in about
    # 8 ms a slice, pylibjpeg in about 11.5 ms, so GDCM goes first when both are installed.
    "1.2.840.10008.1.2.4.70": ("gdcm", "pylibjpeg"),
    "1.2.840.10008.1.2.4.57": ("gdcm", "pylibjpeg"),
}
"""Plugin preference per transfer syntax; syntaxes not listed use pydicom's own order."""

DEFLATED = "1.2.840.10008.1.2.1.99"
"""Deflated Explicit VR Little Endian: the whole dataset is compressed (pydicom inflates it on a full read)."""

# What each pydicom decoding plugin needs, by pip package name (for messages about missing plugins).
PLUGIN_PACKAGES: dict[str, str] = {
    "gdcm": "python-gdcm",
    "pylibjpeg": "pylibjpeg + pylibjpeg-libjpeg (JPEG, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000), pylibjpeg-rle (RLE)",
    "pillow": "pillow",
    "pyjpegls": "pyjpegls",
    "pydicom": "pydicom",
}


# pydicom names a plugin's dependencies by import name; pip wants the distribution name.
_PIP_NAMES: dict[str, str] = {"gdcm": "python-gdcm"}


def install_hint(missing: str) -> str:
    """pydicom's ``"<plugin> - requires <dep> and <dep>"`` -> ``'pip install "<dist>" "<dist>"'`` (pip names, quoted).

    pydicom spells GDCM's dependency ``gdcm>=3.0.10``, but ``pip install gdcm`` does not give GDCM: the package
    is ``python-gdcm``. A text without ``requires`` (a plugin unavailable for another reason) is returned as is.
    """
    _, sep, deps = missing.partition(" - requires ")
    if not sep:
        return missing.partition(" - ")[2] or missing
    parts = [d.strip() for d in re.split(r",\s*|\s+and\s+", deps) if d.strip()]
    out = []
    for dep in parts:
        name = re.match(r"[A-Za-z0-9_.\-]+", dep).group(0)
        out.append(_PIP_NAMES.get(name.lower(), name) + dep[len(name):])
    return "pip install " + " ".join(f'"{d}"' if re.search(r"[<>=!~ ]", d) else d for d in out)


def uid_name(uid: str) -> str:
    """The transfer syntax's name as pydicom knows it, or ``"unknown transfer syntax"``."""
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name != uid else "unknown transfer syntax"


def available_plugins(tsyntax: str) -> tuple[str, ...]:
    """Decoding plugins that can decode ``tsyntax`` here, in the order :func:`read_slices` tries them.

    Native (uncompressed) syntaxes need no plugin and return ``("native",)``; syntaxes pydicom cannot decode
    at all return ``()``.
    """
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        return ()
    if decoder.is_native:
        return ("native",)
    have = tuple(decoder.available_plugins)
    first = tuple(p for p in PREFERRED_PLUGINS.get(str(tsyntax), ()) if p in have)
    return first + tuple(p for p in have if p not in first)


def decoder_table(tsyntaxes: Iterable[str] = COMPETITION_TRANSFER_SYNTAXES) -> list[dict]:
    """Which pydicom decoding plugins serve each transfer syntax in this environment.

    Returns
    -------
    list of dict
        One per syntax: ``uid``, ``name``, ``direct`` (the route tried before pydicom's plugins, see
        :mod:`cspine_submit.read.pixels`: ``["numpy"]`` for uncompressed little-endian data, the direct JPEG decoders in
        the order tried for JPEG Lossless, else empty), ``available`` (pydicom plugin names, in the order the reader
        tries them; ``["native"]`` for uncompressed data), ``missing`` (``{plugin: what to install}``) and ``ok``.
    """
    from pydicom.pixels import get_decoder

    rows = []
    for uid in tsyntaxes:
        direct = (["numpy"] if str(uid) in pixels.NATIVE_SYNTAXES else list(pixels.available_jpeg_decoders())
                  if str(uid) in pixels.JPEG_LOSSLESS_SYNTAXES else [])
        row = {"uid": str(uid), "name": uid_name(uid), "direct": direct, "available": [], "missing": {}, "ok": False}
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            row["missing"] = {"(none)": "pydicom has no decoder for this transfer syntax"}
            rows.append(row)
            continue
        row["available"] = list(available_plugins(uid))
        if not decoder.is_native:
            for text in decoder.missing_dependencies:
                plugin = text.partition(" - ")[0]
                row["missing"][plugin] = install_hint(text).strip() or PLUGIN_PACKAGES.get(plugin, plugin)
        row["ok"] = bool(row["available"])
        rows.append(row)
    return rows


REQUIRED_TRANSFER_SYNTAXES: tuple[str, ...] = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70")
"""Without a decoder for these the competition's studies cannot be read (uncompressed and JPEG Lossless SV1)."""


def missing_decoders(
    required: Iterable[str] = REQUIRED_TRANSFER_SYNTAXES, table: list[dict] | None = None
) -> list[str]:
    """What to install so that every ``required`` syntax can be decoded: ``["<plugin>: <pip install ...>", ...]``.

    Empty when all can be decoded. For a syntax with no plugin, any one of its listed packages suffices.
    Meant for a start-up check that fails with one message listing every missing package.
    """
    required = set(required)
    rows = decoder_table(sorted(required)) if table is None else table
    return list(dict.fromkeys(
        f"{plugin}: {need}" for row in rows if row["uid"] in required and not row["ok"]
        for plugin, need in row["missing"].items()
    ))

