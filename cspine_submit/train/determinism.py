"""What makes two trainings of the same data, config and seed write the same bytes.

- :func:`pin_threads`: TensorFlow's intra-op thread pool fixed for training. CPU kernels (Eigen contractions and
  convolutions, oneDNN) split their sums by the pool's size, so the same run at 1 and at 2 threads differed in every
  tensor; op determinism (``tf.config.experimental.enable_op_determinism``) does not remove that (measured: same
  weights as without it at each thread count, different weights between counts), so the pool size is what is fixed.
  Results still depend on the CPU's instruction set (AVX2 / AVX-512 kernels sum in other orders) and, on a GPU, on
  cuDNN's algorithm choice.
- :func:`normalise_keras_file`: a ``.keras`` file is a zip whose ``metadata.json`` carries ``date_saved``, whose
  ``config.json`` carries ``shared_object_id`` values that are Python ``id()`` numbers (different in every
  process), and whose weight entry carries the time of writing. Rewritten with a fixed entry time, without the date
  and with the ids renumbered in order of appearance, the same weights give the same bytes (and the same
  MANIFEST.json). Keras reads the ids only to match the objects that share one, which renumbering keeps.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

ZIP_TIME = (1980, 1, 1, 0, 0, 0)
"""The entry time of every member of a normalised ``.keras`` zip (the zip format's epoch)."""


def pin_threads(n: int) -> tuple[int, str | None]:
    """Fix TensorFlow's intra-op thread pool at ``n`` threads (0: leave TensorFlow's default).

    The pool can only be sized before TensorFlow starts its runtime (the first op or device context); a caller that
    started it earlier with another size keeps that size.

    Returns
    -------
    threads : int
        The pool size training runs with (0: TensorFlow's default, the machine's cores).
    warning : str or None
        Why the weights may not be reproducible elsewhere (the pool was already started at another size).
    """
    import tensorflow as tf

    if n <= 0:
        return tf.config.threading.get_intra_op_parallelism_threads(), None
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(n))
        return int(n), None
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads()
        return current, (f"TensorFlow was started before training with {current or 'its default number of'} "
                         f"intra-op threads, not {n}: the weights are reproducible only at that thread count")


def _renumber_shared_ids(node, ids: dict):
    if isinstance(node, dict):
        return {k: (ids.setdefault(v, len(ids) + 1) if k == "shared_object_id" else _renumber_shared_ids(v, ids))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_renumber_shared_ids(v, ids) for v in node]
    return node


def normalise_keras_file(path: str | Path) -> Path:
    """Rewrite a ``.keras`` zip in place (atomically) so that its bytes depend only on the model: fixed entry
    times, no ``date_saved``, ``shared_object_id`` renumbered 1, 2, ... in order of appearance; entries in their
    order, stored as Keras stores them."""
    path = Path(path)
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info.filename)) for info in src.infolist()]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w") as dst:
        for info, data in entries:
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta, sort_keys=True).encode()
            elif info.filename == "config.json":
                data = json.dumps(_renumber_shared_ids(json.loads(data), {})).encode()
            out = zipfile.ZipInfo(info.filename, date_time=ZIP_TIME)
            out.compress_type = info.compress_type
            out.external_attr = 0o644 << 16
            dst.writestr(out, data)
    tmp.replace(path)
    return path
