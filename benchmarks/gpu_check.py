"""GPU check: does the package train and score on this machine's GPUs, how fast, in how much memory, reproducibly?

Scoring (every Keras backend installed: tensorflow, torch, jax; each in its own process, Keras picks its backend at
import): the seed head at 512x512x1 and the gap head at 256x256x3, in float32 and mixed float16, through the
package's own scoring path (``cspine_submit.score.prediction.predict``: uint16 crops as workers send them, padded
batches). Per case: images per second after a warm-up, peak memory per device (TensorFlow's and torch's allocator
peaks, XLA's ``peak_bytes_in_use``, the process's peak RSS on a CPU) next to the memory plan's estimate
(``score.memory``), whether two inference runs on the same crops are bit-identical, and the largest difference from
the first backend's float32 probabilities (the weights are the same numbers on every backend: drawn with numpy).
Then a 5-fold gap ensemble shared by the vertebrae, loaded and placed by the package over every device the backend
sees, scored as a study is, against the same ensemble on one device: img/s of each, largest difference.

Training (TensorFlow only, skipped without it): ``cspine-submit synth`` writes a few synthetic studies and
``cspine-submit train --epochs 1 --folds 2 --shared`` trains on them with ``--jit-compile on`` and ``off``; wall seconds and
whether it ran.

The scoring part needs only numpy, keras, one backend (TensorFlow, PyTorch or JAX) and this package's files (no
TensorFlow on a machine with only torch or jax: run it from a checkout, ``PYTHONPATH=.``):

    python benchmarks/gpu_check.py                       # full sizes (a GPU machine)
    python benchmarks/gpu_check.py --quick               # small inputs, few batches: shows it works on a CPU
    python benchmarks/gpu_check.py --backends torch,jax --no-train --json gpu_check.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "torch", "jax")

FULL_CASES = [("seed", 512, 1, 16), ("gap", 256, 3, 32)]
QUICK_CASES = [("seed", 64, 1, 4), ("gap", 64, 3, 4)]


# --------------------------------------------------------------------------------------------------------------
# Scoring, in a process of one backend


def _numpy_weights(model, seed: int = 0) -> None:
    """The same weights on every backend: each variable drawn from one numpy generator in model order (scaled by its
    fan-in so the probabilities stay inside (0, 1); BatchNormalization variances positive)."""
    rng = np.random.default_rng(seed)
    values = []
    for v in model.weights:
        shape = tuple(v.shape)
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        w = rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), shape).astype(np.float32)
        if "moving_variance" in v.path or "gamma" in v.path:
            w = 1.0 + 0.1 * np.abs(w)
        elif "moving_mean" in v.path or "beta" in v.path or "bias" in v.path:
            w = 0.01 * w
        values.append(w)
    model.set_weights(values)


def _reset_peaks(backend: str) -> None:
    if backend == "tensorflow":
        import tensorflow as tf

        for d in tf.config.list_logical_devices("GPU"):
            tf.config.experimental.reset_memory_stats(d.name)
    elif backend == "torch":
        import torch

        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def _peaks(backend: str) -> dict[str, float]:
    """Peak MiB per device since the last reset (jax: since start; CPU: the process's peak RSS)."""
    import resource

    out: dict[str, float] = {}
    if backend == "tensorflow":
        import tensorflow as tf

        for d in tf.config.list_logical_devices("GPU"):
            out[d.name] = tf.config.experimental.get_memory_info(d.name)["peak"] / 2**20
    elif backend == "torch":
        import torch

        for i in range(torch.cuda.device_count()):
            out[f"cuda:{i}"] = torch.cuda.max_memory_allocated(i) / 2**20
    else:
        import jax

        for d in jax.devices():
            stats = d.memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                out[f"{d.platform}:{d.id}"] = stats["peak_bytes_in_use"] / 2**20
    if not out:
        out["host RSS"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _devices(backend: str) -> list[str]:
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus] or ["CPU"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["CPU"]
    import jax

    return [f"{d.device_kind} ({d.platform})" for d in jax.devices()]


def score_case(backend: str, head: str, size: int, channels: int, batch: int, precision: str, n_batches: int) -> dict:
    """One scoring case in this process (its backend): img/s, peak memory, plan estimate, reproducibility."""
    import keras

    from cspine_submit.config import ModelConfig
    from cspine_submit.score import memory
    from cspine_submit.score.architectures import build_classifier
    from cspine_submit.score.crop import encode_crops
    from cspine_submit.score.devices import dtype_policy
    from cspine_submit.score.prediction import predict

    with dtype_policy(precision):
        model = build_classifier(head, (size, size, channels))
    _numpy_weights(model)
    rng = np.random.default_rng(1)
    crops = encode_crops(rng.uniform(0, 1, (batch * n_batches, size, size, channels)))
    _reset_peaks(backend)
    predict(model, crops[:batch], batch)  # compile / trace outside the clock
    t0 = time.perf_counter()
    first = predict(model, crops, batch)
    seconds = time.perf_counter() - t0
    second = predict(model, crops, batch)
    config = ModelConfig(head=head, input_size=size, channels="single" if channels == 1 else "replicate",
                         windows=((400.0, 1800.0),), batch_size=batch)
    net = memory.network_bytes(config, precision)
    return {
        "backend": backend, "keras_backend": keras.backend.backend(), "head": head, "input": [size, size, channels],
        "batch": batch, "precision": precision, "images": int(crops.shape[0]), "img_per_s": crops.shape[0] / seconds,
        "peak_mib": _peaks(backend), "plan_mib": (net.weights + net.call(batch)) / 2**20,
        "bit_identical": bool(np.array_equal(first, second)), "probabilities": first.tolist(),
    }


def ensemble_case(backend: str, size: int, batch: int, folds: int, n_batches: int) -> dict:
    """A ``folds``-member gap ensemble shared by the seven vertebrae (``train --shared``'s output), loaded by the
    package (``load_classifiers``: the memory plan spreads it over every device this backend sees) and scored with
    ``prediction.score`` as a study is: img/s (each crop through every member) against the same ensemble on the
    first device only, and their largest difference (the issue's bar: 1e-6)."""
    from contextlib import nullcontext

    import keras

    from cspine_submit.config import VERTEBRAE, ModelConfig
    from cspine_submit.score import loading, plan_devices, prediction
    from cspine_submit.score.architectures import build_classifier
    from cspine_submit.score.crop import encode_crops

    config = ModelConfig(head="gap", input_size=size, batch_size=batch, mixed_precision=False,
                         classifier_files={v: tuple(f"all.f{i}.keras" for i in range(folds)) for v in VERTEBRAE})
    rng = np.random.default_rng(2)
    crops = encode_crops(rng.uniform(0, 1, (batch * n_batches, size, size, 3)))
    by_vertebra = dict(zip(VERTEBRAE, np.array_split(crops, 7)))
    with tempfile.TemporaryDirectory(prefix="gpu_check_ensemble_") as tmp:
        for i in range(folds):
            model = build_classifier("gap", config.input_shape)
            _numpy_weights(model, seed=10 + i)
            loading.save_classifier(model, Path(tmp) / f"all.f{i}.keras")
        config.to_json(Path(tmp) / "model_config.json")
        config, models = loading.load_classifiers(tmp)
        plan = plan_devices(config).with_placement(models)
        first = plan.devices[0]
        if backend == "tensorflow":
            import tensorflow as tf

            scope = tf.device(first)
        else:
            from cspine_submit.score.backends import keras_device

            scope = keras.device(keras_device(first)) if first else nullcontext()
        with scope:
            members = [loading.load_classifier(Path(tmp) / f, config) for f in config.classifier_paths("C1")]
            one = loading.average_classifiers(members, config.input_shape, "one")
        object.__setattr__(one, "_cspine_device", first)
        rates = {}
        results = {}
        for name, placed in (("spread", models), ("one device", {v: one for v in VERTEBRAE})):
            prediction.score(placed, {v: c[:batch] for v, c in by_vertebra.items()}, batch)  # trace outside the clock
            t0 = time.perf_counter()
            results[name] = prediction.score(placed, by_vertebra, batch)
            rates[name] = crops.shape[0] / (time.perf_counter() - t0)
    diff = max(float(np.max(np.abs(results["spread"][v] - results["one device"][v]), initial=0.0)) for v in VERTEBRAE)
    return {"backend": backend, "ensemble": folds, "input": [size, size, 3], "batch": batch,
            "placement": plan.memory.placement if plan.memory else "?", "devices": list(plan.devices),
            "img_per_s_spread": rates["spread"], "img_per_s_one_device": rates["one device"], "max_diff": diff}


def score_worker(backend: str, quick: bool) -> None:
    """Every case on this process's backend; one JSON line per case on stdout (errors as entries, not crashes)."""
    cases = QUICK_CASES if quick else FULL_CASES
    n_batches = 2 if quick else 8
    print(json.dumps({"backend": backend, "devices": _devices(backend)}), flush=True)
    for head, size, channels, batch in cases:
        for precision in ("float32", "mixed_float16"):
            try:
                row = score_case(backend, head, size, channels, batch, precision, n_batches)
            except Exception as exc:  # noqa: BLE001 - a case that cannot run is a result
                row = {"backend": backend, "head": head, "input": [size, size, channels], "batch": batch,
                       "precision": precision, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(json.dumps(row), flush=True)
    size, batch = (64, 4) if quick else (256, 32)
    try:
        row = ensemble_case(backend, size, batch, folds=5, n_batches=n_batches)
    except Exception as exc:  # noqa: BLE001 - a case that cannot run is a result
        row = {"backend": backend, "ensemble": 5, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print(json.dumps(row), flush=True)


# --------------------------------------------------------------------------------------------------------------
# The driver


def run_backend(backend: str, quick: bool, timeout: float) -> list[dict]:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--score-worker", backend] + (["--quick"] if quick else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"backend": backend, "error": f"timed out after {timeout:.0f} s"}]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        rows.append({"backend": backend, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"})
    return rows


def train_check(quick: bool, timeout: float) -> list[dict]:
    """One epoch on a few synthetic studies with XLA on and off (TensorFlow's training path, the package's CLI)."""
    if importlib.util.find_spec("tensorflow") is None:
        return [{"train": "skipped: TensorFlow is not installed (training is TensorFlow only)"}]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cli = [sys.executable, "-m", "cspine_submit.cli"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        data = Path(tmp) / "synth"
        n, size = ("4", "96") if quick else ("8", "256")
        subprocess.run(cli + ["synth", str(data), "--studies", n, "--test", "0", "--seed", "3", "--size", size,
                              "--quiet"], check=True, env=env, capture_output=True, timeout=timeout)
        head, input_size = ("tiny", "64") if quick else ("gap", "256")
        for jit in ("on", "off"):
            out = Path(tmp) / f"weights_{jit}"
            cmd = cli + ["train", "--data", str(data), "--ranges", str(REPO / "weights" / "slice_ranges.json"),
                         "--out", str(out), "--work-dir", str(Path(tmp) / f"work_{jit}"), "--head", head,
                         "--input-size", input_size, "--epochs", "1", "--folds", "2", "--shared",
                         "--trained-on", "synthetic", "--jit-compile", jit, "--quiet"]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
                lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                         if ln.strip() and not ln.startswith(("I0000", "W0000", "E0000", "WARNING: All log"))]
                rc, tail = proc.returncode, lines[-3:]
            except subprocess.TimeoutExpired:
                rc, tail = None, [f"timed out after {timeout:.0f} s"]
            rows.append({"train": f"XLA {jit}", "head": head, "input": input_size, "studies": int(n), "rc": rc,
                         "seconds": round(time.perf_counter() - t0, 1), "tail": tail})
    return rows


def _print_scores(rows: list[dict]) -> None:
    ref = {}
    for r in rows:
        if "probabilities" in r and r["precision"] == "float32":
            ref.setdefault((r["head"], tuple(r["input"])), np.asarray(r["probabilities"]))
    print(f"{'backend':<11}{'head':<6}{'input':>12}{'precision':>15}{'batch':>6}{'img/s':>9}  {'peak MiB per device':<34}"
          f"{'plan MiB':>9}{'same twice':>11}{'max|dp|':>10}")
    for r in rows:
        if "devices" in r and "ensemble" not in r:
            print(f"# {r['backend']}: {', '.join(r['devices'])}")
            continue
        if "ensemble" in r:
            if "error" in r:
                print(f"{r['backend']:<11}ensemble of {r['ensemble']}  ERROR {r['error']}")
            else:
                print(f"{r['backend']:<11}ensemble of {r['ensemble']} gap at {r['input'][0]}: {r['placement']} on "
                      f"{'+'.join(r['devices'])}: {r['img_per_s_spread']:.1f} img/s (one device "
                      f"{r['img_per_s_one_device']:.1f}), max|dp| {r['max_diff']:.1e}")
            continue
        shape = "x".join(map(str, r.get("input", [])))
        if "error" in r:
            print(f"{r['backend']:<11}{r.get('head', ''):<6}{shape:>12}{r.get('precision', ''):>15}  ERROR {r['error']}")
            continue
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_mib"].items())
        diff = np.max(np.abs(np.asarray(r["probabilities"]) - ref[(r["head"], tuple(r["input"]))]))
        print(f"{r['backend']:<11}{r['head']:<6}{shape:>12}{r['precision']:>15}{r['batch']:>6}{r['img_per_s']:>9.1f}  "
              f"{peaks:<34}{r['plan_mib']:>9.0f}{str(r['bit_identical']):>11}{diff:>10.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small inputs and few batches (runs on a CPU)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated (default: every installed)")
    parser.add_argument("--no-train", action="store_true", help="scoring only")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per backend / per training run")
    parser.add_argument("--json", type=Path, help="also write every result here")
    parser.add_argument("--score-worker", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.score_worker:
        score_worker(args.score_worker, args.quick)
        return 0
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    have = [b for b in wanted if importlib.util.find_spec(b) is not None]
    print(f"backends: {have} (not installed: {[b for b in wanted if b not in have]}); python {sys.version.split()[0]}; "
          f"{'quick' if args.quick else 'full'} sizes", flush=True)
    rows = [row for b in have for row in run_backend(b, args.quick, args.timeout)]
    _print_scores(rows)
    train = [] if args.no_train else train_check(args.quick, args.timeout)
    for t in train:
        print(" ".join(f"{k}={v}" for k, v in t.items()))
    if args.json:
        args.json.write_text(json.dumps({"scores": rows, "train": train}, indent=1))
    bad = [r for r in rows if "error" in r] + [t for t in train if t.get("rc") not in (None, 0) and "rc" in t]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
