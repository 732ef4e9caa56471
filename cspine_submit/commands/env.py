"""Report the environment: versions of Python and the libraries the package relies on, TensorFlow's GPUs,
and which pydicom decoding plugin serves each transfer syntax the competition's studies may use.

Exits with status 1 (after naming every package to install) when a syntax the competition needs
(uncompressed, or JPEG Lossless SV1 .4.70) has no decoder here.
"""

from __future__ import annotations

import json
import platform
import sys

from cspine_submit import quiet
from cspine_submit.tools.reproduce import decoder_route

NAME = "env"
HELP = "library versions, GPUs and the DICOM decoder table"
ORDER = 90

# (label, distribution name, importable module): the distribution name is what `pip install` wants.
LIBRARIES: tuple[tuple[str, str, str], ...] = (
    ("numpy", "numpy", "numpy"),
    ("pydicom", "pydicom", "pydicom"),
    ("GDCM", "python-gdcm", "gdcm"),
    ("dicomsdl (direct JPEG Lossless)", "dicomsdl", "dicomsdl"),
    ("pylibjpeg", "pylibjpeg", "pylibjpeg"),
    ("pylibjpeg-libjpeg (JPEG, JPEG-LS)", "pylibjpeg-libjpeg", "libjpeg"),
    ("pylibjpeg-openjpeg (JPEG 2000)", "pylibjpeg-openjpeg", "openjpeg"),
    ("pylibjpeg-rle (RLE)", "pylibjpeg-rle", "rle"),
    ("pillow", "pillow", "PIL"),
    ("pyjpegls", "pyjpegls", "jpeg_ls"),
    ("nibabel", "nibabel", "nibabel"),
    ("opencv", "opencv-python-headless", "cv2"),
    ("pandas", "pandas", "pandas"),
)



def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--no-tensorflow", action="store_true",
                        help="skip importing TensorFlow (it takes a few seconds)")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's start-up messages (CUDA probing)")


def _version(dist: str, module: str) -> str | None:
    import importlib.metadata
    import importlib.util

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        # Installed some other way (e.g. a conda build of GDCM): importable but without pip metadata.
        if importlib.util.find_spec(module) is not None:
            try:
                mod = __import__(module)
            except Exception as exc:  # a broken build (e.g. a missing shared library) is what env must show
                return f"installed but cannot be imported ({type(exc).__name__}: {exc})"
            return str(getattr(mod, "__version__", "installed (version unknown)"))
        return None


def _tensorflow(verbose: bool = False) -> dict:
    try:
        tf = quiet.start_tensorflow(verbose)
    except ImportError as exc:
        return {"version": None, "error": f"not installed ({exc}); pip install tensorflow", "gpus": []}
    gpus = []
    for dev in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(dev)
        except Exception:  # details are best effort
            details = {}
        gpus.append({"name": dev.name, "device_name": details.get("device_name", ""),
                     "compute_capability": list(details.get("compute_capability", ()) or ())})
    import keras

    return {"version": tf.__version__, "keras": keras.__version__, "gpus": gpus,
            "built_with_cuda": bool(tf.test.is_built_with_cuda())}


def collect(tensorflow: bool = True, verbose: bool = False) -> dict:
    """Everything ``env`` reports, as a JSON-able dict (library function: no printing); TensorFlow's start-up
    messages are hidden unless ``verbose``."""
    from cspine_submit import __version__
    from cspine_submit.read.dicom import REQUIRED_TRANSFER_SYNTAXES, decoder_table, missing_decoders

    libs = {label: {"package": dist, "version": _version(dist, module)} for label, dist, module in LIBRARIES}
    table = decoder_table()
    missing_required = missing_decoders(REQUIRED_TRANSFER_SYNTAXES, table)
    return {
        "cspine_submit": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": libs,
        "tensorflow": _tensorflow(verbose) if tensorflow else None,
        "decoders": table,
        "missing_required": missing_required,
        "ok": all(row["ok"] for row in table if row["uid"] in REQUIRED_TRANSFER_SYNTAXES),
    }


def format_text(info: dict) -> str:
    """The human-readable report."""
    lines = [f"cspine_submit {info['cspine_submit']}", f"Python {info['python']} on {info['platform']}", ""]
    width = max(len(label) for label in info["libraries"]) + 2
    for label, lib in info["libraries"].items():
        version = lib["version"] or f"not installed (pip install {lib['package']})"
        lines.append(f"{label:<{width}}{version}")
    tf = info["tensorflow"]
    if tf is None:
        lines.append(f"{'tensorflow':<{width}}(not checked: --no-tensorflow)")
    elif tf["version"] is None:
        lines.append(f"{'tensorflow':<{width}}{tf['error']}")
    else:
        lines.append(f"{'tensorflow':<{width}}{tf['version']} (keras {tf['keras']})")
        gpus = ", ".join(
            f"{g['name']} {g['device_name']}".strip()
            + (f" cc {'.'.join(map(str, g['compute_capability']))}" if g["compute_capability"] else "")
            for g in tf["gpus"]
        )
        lines.append(f"{'GPUs':<{width}}{gpus or 'none (CPU only)'}")
    lines += ["", "DICOM decoding (the direct route from the scan first, then pydicom's plugins in the order tried):"]
    lines.append(f"  {'transfer syntax':<24}{'name':<50}{'plugins':<34}missing")
    for row in info["decoders"]:
        plugins = decoder_route(row)
        missing = "; ".join(f"{k}: {v}" for k, v in row["missing"].items())
        lines.append(f"  {row['uid']:<24}{row['name'][:48]:<50}{plugins:<34}{missing}")
    if info["missing_required"]:
        lines += ["", "error: the competition's syntaxes cannot all be decoded; install one of: "
                  + "; ".join(info["missing_required"])]
    return "\n".join(lines)


def run(args) -> int:
    info = collect(tensorflow=not args.no_tensorflow, verbose=args.verbose)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0 if info["ok"] else 1
