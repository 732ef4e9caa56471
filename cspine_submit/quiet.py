"""Keep TensorFlow's start-up noise out of a command's output unless the user asks for it (``--verbose``).

TensorFlow's C++ side logs through absl before any Python logger applies: the oneDNN notice, "Could not find cuda
drivers", the CPU-feature guard and, on a machine without a GPU, ``E0000 ... failed call to cuInit``. They are
written to file descriptor 2 while TensorFlow is imported and its devices are listed, and say nothing a user of
this package needs (the commands print their own device line). In TensorFlow 2.21 the lines written before absl's
log initialisation ignore ``TF_CPP_MIN_LOG_LEVEL``, so :func:`start_tensorflow` imports TensorFlow with file
descriptor 2 sent to a temporary file (:func:`native_stderr_hidden`, replayed if the start fails);
``TF_CPP_MIN_LOG_LEVEL=3`` (:func:`quiet_tensorflow`, set first, inherited by spawned workers) hides what TensorFlow
logs later.

Not set: ``TF_ENABLE_ONEDNN_OPTS``, which changes numerics (the golden output is computed with oneDNN on).

Use, in a command's ``run`` once its arguments are checked and before anything imports TensorFlow::

    quiet.start_tensorflow(args.verbose)          # import it now, its devices listed, quietly

"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

QUIET_ENV: dict[str, str] = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR"}
"""Environment that hides TensorFlow's (and gRPC's) C++ start-up logging; a value the user set wins."""

START_UP_PATTERNS: tuple[str, ...] = (
    r"^[IWEF]\d{4} \d\d:\d\d:\d\d",  # absl / TSL C++ log lines: I0000 00:00:1796229465.670961 ...
    r"All log messages before absl::InitializeLog\(\) is called",
    r"oneDNN custom operations",
    r"cuInit",
    r"Could not find cuda drivers",
    r"rebuild TensorFlow with the appropriate compiler flags",
)
"""Regular expressions matching TensorFlow's start-up lines (for tests and for filtering captured output)."""


def quiet_tensorflow(verbose: bool = False) -> None:
    """Set :data:`QUIET_ENV` (unless ``verbose``): TensorFlow's C++ logging after its start, here and in spawned
    workers, stays quiet. Not enough alone for the start-up lines: see :func:`start_tensorflow`."""
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "tensorflow" in sys.modules:
        sys.modules["tensorflow"].get_logger().setLevel("ERROR")


@contextmanager
def native_stderr_hidden(hide: bool = True):
    """Send file descriptor 2 to a temporary file for the ``with`` body (TensorFlow's C++ start-up writes there
    before any log level applies); replay what was written only if the body raises."""
    if not hide:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-5000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def start_tensorflow(verbose: bool = False):
    """Import TensorFlow and let it find its devices, quietly unless ``verbose``. Returns the module.

    Raises ImportError when TensorFlow is not installed (with its start-up output replayed).
    """
    quiet_tensorflow(verbose)
    with native_stderr_hidden(not verbose):
        import tensorflow as tf

        tf.config.list_physical_devices()
    if not verbose:
        tf.get_logger().setLevel("ERROR")
    return tf
