"""Write submission.csv: ``python make_submission.py [submit options]`` = ``cspine-submit submit [options]``.

Also the Kaggle kernel's code file. On Kaggle it finds the attached package dataset (the folder under
/kaggle/input holding ``cspine_submit/``), puts it on sys.path, installs the decoder wheels from its ``wheels/``
offline when pydicom 3, a JPEG Lossless decoder or dicomsdl is missing, and runs. With no arguments: the competition's
test set on Kaggle, the built-in demo elsewhere.
"""

import glob
import importlib
import os
import subprocess
import sys

# Kaggle may run a script kernel as a notebook cell, where __file__ is not defined.
HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()


def find_package_root():
    """This file's folder if it holds the package, else the attached Kaggle dataset that does."""
    candidates = [HERE] + sorted(glob.glob("/kaggle/input/*")) + sorted(glob.glob("/kaggle/input/*/*"))
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "cspine_submit", "__init__.py")):
            return folder
    sys.exit("make_submission.py: cannot find the cspine_submit package beside this file or under /kaggle/input "
             "(attach the dataset built by `cspine-submit bundle`)")


def decoders_ok():
    """pydicom >= 3 plus a JPEG Lossless (.4.70) decoder: GDCM or pylibjpeg with libjpeg."""
    try:
        import pydicom

        if int(pydicom.__version__.split(".")[0]) < 3:
            return False
    except ImportError:
        return False
    for names in (("gdcm",), ("pylibjpeg", "libjpeg")):
        try:
            for name in names:
                importlib.import_module(name)
            return True
        except ImportError:
            continue
    return False


def fast_decoder_ok():
    """dicomsdl, the fastest direct .4.70 decoder: without it the run is as right but decodes about 2.5x slower."""
    try:
        importlib.import_module("dicomsdl")
        return True
    except ImportError:
        return False


def install_wheels(root):
    wheels = os.path.join(root, "wheels")
    if not os.path.isdir(wheels):
        print(f"make_submission.py: decoders missing and no {wheels}; continuing (studies may fall back)")
        return
    print(f"make_submission.py: installing decoder wheels offline from {wheels}", flush=True)
    # The wheel files themselves, not package names: an older pydicom already installed would "satisfy" a name.
    # One at a time: if one cannot be installed (e.g. pylibjpeg-libjpeg needs numpy >= 2 and the image has 1.x),
    # the others (GDCM alone decodes .4.70) still are.
    for wheel in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels,
                               "--quiet", "--disable-pip-version-check", wheel], check=False)
        if done.returncode:
            print(f"make_submission.py: could not install {os.path.basename(wheel)} (see pip's message above)")
    for name in [m for m in sys.modules if m == "pydicom" or m.startswith("pydicom.")]:
        del sys.modules[name]  # an old pydicom imported by decoders_ok() must not shadow the new one
    importlib.invalidate_caches()


def main(argv):
    root = find_package_root()
    if root not in sys.path:
        sys.path.insert(0, root)
    if not decoders_ok() or not fast_decoder_ok():
        install_wheels(root)
        if not decoders_ok():
            print("make_submission.py: WARNING: still no JPEG Lossless decoder; the run's start-up check will stop "
                  "it (exit 3) unless --allow-priors is given")
    from cspine_submit.cli import main as cli_main

    return cli_main(["submit", *argv])


def _argv():
    """Command-line options, plus those in ``$CSPINE_SUBMIT_ARGS`` (a notebook cell can set it with
    ``%env CSPINE_SUBMIT_ARGS=--allow-priors``); none from a Jupyter kernel's own command line (its
    ``-f kernel.json`` is not for us)."""
    import shlex

    extra = shlex.split(os.environ.get("CSPINE_SUBMIT_ARGS", ""))
    if "ipykernel" in os.path.basename(sys.argv[0]) or "ipykernel" in sys.modules:
        return extra
    return sys.argv[1:] + extra


if __name__ == "__main__":
    code = main(_argv())
    from cspine_submit.cli import exit_promptly_after_interrupt

    exit_promptly_after_interrupt(code)  # after Ctrl-C / SIGTERM: the process ends within 20 s (not in a notebook)
    if "ipykernel" not in sys.modules:  # sys.exit inside a notebook cell shows a traceback-like SystemExit
        sys.exit(code)
    elif code:
        raise RuntimeError(f"cspine-submit submit failed with exit code {code}: see the messages at the top of the "
                           "log (submission.csv is complete but holds priors where the run could not score)")
