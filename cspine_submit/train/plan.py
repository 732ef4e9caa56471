"""``train --plan``: what a training run will cost, from the data folder's headers, before training anything.

Reads the headers of up to ``sample`` studies (no pixels), plans their crops exactly as training and inference do,
and extrapolates to every study of train.csv: studies, crops, raw and projected cache bytes. Then it caches a few
studies for real (decoding their slices) to measure the compression ratio and the seconds per study of building
the cache, streams their crops through the training input pipeline to measure crops per second on this machine,
times a few training steps of the configured network on this machine, and projects the time per epoch here and on
a T4 and a P100 (published GPU figures below), and the disk the run takes (cache, models, checkpoints) against a
Kaggle notebook's 20 GB. Before any of that, from train.csv alone, it counts the fractured and intact studies per
vertebra and fold and refuses a run in which some model would see only one class. Every assumption is in the
returned dict (``assumptions``).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cspine_submit.config import VERTEBRAE, ModelConfig
from cspine_submit.read.reader import iter_studies
from cspine_submit.train import data as td

GPU_TRAIN_224: dict[str, dict] = {
    "T4": {"img_s": 1270.0 / 3.0, "precision": "mixed float16",
           "source": "NVIDIA DeepLearningExamples: a V100 trains ResNet-50 at about 1270 img/s (mixed precision + "
                     "XLA, 224 px); a T4 about a third of a V100. Measured with XLA: two T4s train under "
                     "MirroredStrategy with XLA off (--jit-compile auto), so expect less than twice this there"},
    "P100": {"img_s": 219.0, "precision": "float32",
             "source": "TensorFlow's published tf_cnn_benchmarks: ResNet-50 training on a P100, float32, 224 px, "
                       "219 img/s (a P100 has no fast float16, so it trains in float32)"},
}
"""ResNet-50 training throughput at 224 x 224 px; scaled by pixel count to other input sizes."""

KAGGLE_DISK_BYTES = 20e9
"""A Kaggle notebook's writable ``/kaggle/working`` (20 GB): cache, work folder and weights must fit in it."""


def _header_plan(job) -> dict:
    """Crops per vertebra and the side of each stored square, from headers only (top level: picklable)."""
    from cspine_submit import localize
    from cspine_submit.read import dicom
    from cspine_submit.score.crop import crop_square, n_planes

    folder, ranges_path, config_json = job
    config = ModelConfig(**json.loads(config_json))
    header = dicom.scan_study(folder)
    plans = localize.plan_crops(header, localize.load_ranges(ranges_path), config)
    per = {}
    for v, plan in plans.items():
        side = min(crop_square(plan.box, config.crop_margin)[2], config.input_size)
        per[v] = {"crops": len(plan.slice_indices), "side": int(side)}
    raw = sum(d["crops"] * n_planes(config) * d["side"] ** 2 * 2 for d in per.values())
    return {"n_slices": header.n_slices, "vertebrae": per, "raw_bytes": int(raw)}


def gpu_epoch_seconds(crops: float, input_size: int, head: str) -> dict[str, float | None]:
    """Seconds for ``crops`` training crops on each GPU of :data:`GPU_TRAIN_224` (None for the tiny test head)."""
    if head not in ("seed", "gap"):
        return {g: None for g in GPU_TRAIN_224}
    scale = (224.0 / input_size) ** 2
    return {g: float(crops / (d["img_s"] * scale)) for g, d in GPU_TRAIN_224.items()}


def measure_input_pipeline(samples, config: ModelConfig, workers: int = 2, batch_size: int = 16,
                           min_crops: int = 512) -> float:
    """Crops per second of the training input pipeline (read, decompress, enlarge, window, batch)."""
    reps = int(np.ceil(min_crops / max(len(samples), 1)))
    many = td.Samples.concat([samples] * reps)
    # No augmentation here: training augments on the GPU, inside the model (train_data.augmenting_model).
    ds = td.make_dataset(many, config, batch_size, shuffle=True, augment_data=False, seed=0, workers=workers)
    it = iter(ds)
    next(it)  # trace once
    t0 = time.perf_counter()
    n = 0
    for x, _, _ in it:
        n += int(x.shape[0])
    return n / max(time.perf_counter() - t0, 1e-9)


@dataclass(frozen=True)
class HeaderSample:
    """What the headers of the sampled studies say (step 1 of :func:`plan_training`)."""

    labels: dict            # train.csv, {uid: {label: 0/1}}
    uids: list              # train.csv's studies (after ``limit``)
    chosen: list            # the sampled studies
    read: dict              # {uid: _header_plan(...)} of those that planned
    failed: list            # [{"uid", "error"}] of those that did not


def read_header_sample(data_dir: Path, ranges_path: Path, config: ModelConfig, *, sample: int, limit: int | None,
                       workers: int, seed: int) -> HeaderSample:
    """Step 1: plan the crops of up to ``sample`` studies of train.csv from their headers (no pixels)."""
    labels = td.read_train_labels(data_dir)
    uids = sorted(labels)[:limit] if limit else sorted(labels)
    if not uids:
        raise ValueError(f"{data_dir / 'train.csv'}: no studies")
    rng = np.random.default_rng(seed)
    chosen = sorted(uids) if len(uids) <= sample else sorted(rng.choice(uids, sample, replace=False).tolist())
    cfg_json = json.dumps(json.loads(json.dumps(td._config_dict(config))))
    images = data_dir / "train_images"
    jobs = [(str(images / u), str(ranges_path), cfg_json) for u in chosen]
    read, failed = {}, []
    for outcome in iter_studies(jobs, _header_plan, workers=workers, prefetch=max(2 * workers, 1)):
        uid = Path(outcome.item[0]).name
        if outcome.ok:
            read[uid] = outcome.value
        else:
            failed.append({"uid": uid, "error": outcome.error})
    if not read:
        raise ValueError(f"{images}: none of the {len(chosen)} studies read could be planned "
                         f"(first error: {failed[0]['error'] if failed else 'none'})")
    return HeaderSample(labels, uids, chosen, read, failed)


def measure_cache(data_dir: Path, ranges_path: Path, config: ModelConfig, headers: HeaderSample, *, measure: int,
                  workers: int) -> dict:
    """Step 2: cache ``measure`` studies for real: compression ratio, build seconds, input crops per second."""
    with tempfile.TemporaryDirectory(prefix="cspine_plan_") as tmp:
        measured = sorted(headers.read)[:measure]
        t0 = time.perf_counter()
        metas, _ = td.build_cache(data_dir, measured, tmp, ranges_path, config, workers=0, progress=False)
        build_s = (time.perf_counter() - t0) / max(len(metas), 1)
        raw_measured = sum(headers.read[u]["raw_bytes"] for u in metas)
        ratio = td.cache_bytes(metas) / raw_measured if raw_measured else 1.0
        parts = [td.collect_samples(metas, metas, v, tmp, headers.labels, {}, "study") for v in
                 sorted({v for m in metas.values() for v in m["vertebrae"]})]
        crops_s = measure_input_pipeline(td.Samples.concat(parts), config, workers=workers) if metas else float("nan")
    return {"ratio": ratio, "studies_measured": len(metas), "build_seconds_per_study": build_s,
            "input_crops_per_s": crops_s}


def project_epoch(n_ok: float, crops_per_study: float, config: ModelConfig, crops_s: float, *, folds: int,
                  shared: bool) -> tuple[dict, float]:
    """Step 3: ``(epoch dict, training share)``: crops per model per epoch, and the seconds of input and of each GPU
    (an epoch takes the longer of the two)."""
    train_share = (folds - 1) / folds if folds >= 2 else 2.0 / 3.0
    per_vertebra = crops_per_study / 7.0
    crops_epoch = n_ok * train_share * per_vertebra * (7.0 if shared else 1.0)
    gpu = gpu_epoch_seconds(crops_epoch, config.input_size, config.head)
    epoch = {"crops_per_model": round(crops_epoch), "cpu_input_seconds": crops_epoch / crops_s}
    for g, sec in gpu.items():
        epoch[f"{g}_seconds"] = None if sec is None else max(sec, epoch["cpu_input_seconds"])
        epoch[f"{g}_input_bound"] = None if sec is None else bool(epoch["cpu_input_seconds"] > sec)
    return epoch, train_share


def project_run(epoch: dict, *, folds: int, epochs: int, final: str, units: int) -> dict:
    """Step 4: models to train and GPU hours for the whole run."""
    models = folds * units + (units if final == "refit" and folds >= 2 else 0)
    run = {"models": models, "epochs": epochs}
    for g in GPU_TRAIN_224:
        sec = epoch[f"{g}_seconds"]
        # + one prediction pass over the held-out fold per model (a third of a training step's cost per crop)
        run[f"{g}_hours"] = None if sec is None else models * epochs * sec / 3600.0 * (1 + 1 / (3 * epochs))
    return run


def _assumptions(config: ModelConfig, train_share: float) -> dict:
    return {
        "gpu": {g: dict(d, img_s_at_input=d["img_s"] * (224.0 / config.input_size) ** 2)
                for g, d in GPU_TRAIN_224.items()},
        "notes": [
            "cache bytes: crops per study and stored square sides from the headers of studies_read studies, "
            "compression ratio measured by caching a few of them; extrapolated to every study",
            "GPU rates scale the 224-px ResNet-50 figure by pixel count; the seed head (Flatten + Dense) "
            "costs a few % more",
            "input_crops_per_s is measured on THIS machine with the given workers (read, decompress, enlarge, "
            "window; the augmentation runs on the GPU); an epoch takes the longer of GPU and input time",
            f"crops per model per epoch: the training folds' share ({train_share:.2f}) of every study's crops "
            "of one vertebra (7 vertebrae with --shared); a fracture's box-less crops are not left out here",
        ],
    }


def _run_plan(data_dir: Path, *, folds: int, seed: int, vertebrae, shared: bool, final: str, limit: int | None):
    """``(RunPlan, TrainOptions)`` as ``train`` will split the studies (train.csv only)."""
    from cspine_submit.train.options import TrainOptions
    from cspine_submit.train.run import plan_run

    unknown = [v for v in vertebrae if v not in VERTEBRAE]
    if unknown:
        raise ValueError(f"unknown vertebrae {unknown}; expected a subset of {list(VERTEBRAE)}")
    options = TrainOptions(vertebrae=tuple(vertebrae), folds=folds, seed=seed, shared=shared, final=final,
                           limit=limit)
    return plan_run(Path(data_dir), options), options


def count_labels(data_dir: Path, *, folds: int, seed: int, vertebrae, shared: bool, final: str,
                 limit: int | None) -> dict:
    """Step 0, from train.csv alone: fractured and intact studies per vertebra and fold (as ``train`` will split
    them); raises ValueError naming ``--shared`` / ``--vertebrae`` when some model could not train."""
    from cspine_submit.train.run import check_trainable, label_counts

    plan, options = _run_plan(data_dir, folds=folds, seed=seed, vertebrae=vertebrae, shared=shared, final=final,
                              limit=limit)
    check_trainable(plan, options)
    return label_counts(plan)


def inference_memory(data_dir: Path, config: ModelConfig, *, folds: int, seed: int, vertebrae, shared: bool,
                     final: str, limit: int | None) -> dict:
    """The memory plan of the classifiers the run will ship on each Kaggle GPU machine (no TensorFlow):
    ``{machine: MemoryPlan}``; raises MemoryPlanError when they fit on none."""
    from cspine_submit.train.run import check_inference_memory

    plan, options = _run_plan(data_dir, folds=folds, seed=seed, vertebrae=vertebrae, shared=shared, final=final,
                              limit=limit)
    return check_inference_memory(config, plan, options)


def time_training_step(config: ModelConfig, *, batch_size: int, steps: int) -> dict:
    """Step 5: ``steps`` timed training steps of the configured network on this machine (after one untimed step
    that builds it), on random crops; the model's size on disk (float32 weights)."""
    import keras
    import tensorflow as tf

    from cspine_submit.score.devices import distribution_strategy, gpu_devices
    from cspine_submit.train import fit
    from cspine_submit.train.options import TrainOptions, resolve_jit_compile

    strategy = distribution_strategy()
    replicas = int(getattr(strategy, "num_replicas_in_sync", 1))
    jit = resolve_jit_compile("auto", gpus=len(gpu_devices()), replicas=replicas)
    fit._set_seeds(0)
    model = fit._make_model(config, TrainOptions(), strategy, 0, jit_compile=jit)
    params = int(fit.classifier_of(model).count_params())
    batch = batch_size * replicas
    x = np.random.default_rng(0).uniform(0, 1, (batch * (steps + 1),) + tuple(config.input_shape)).astype(np.float32)
    y = (np.arange(len(x)) % 2).astype(np.float32)[:, None]
    model.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, verbose=0)  # build and trace
    t0 = time.perf_counter()
    model.fit(x[batch:], y[batch:], batch_size=batch, epochs=1, verbose=0, shuffle=False)
    seconds = (time.perf_counter() - t0) / max(steps, 1)
    keras.backend.clear_session()
    where = "GPU" if gpu_devices() else "CPU"
    return {"device": where, "replicas": replicas, "xla": jit, "batch": batch, "steps": steps,
            "seconds_per_step": seconds, "crops_per_s": batch / seconds, "params": params,
            "model_bytes": params * 4, "tensorflow": tf.__version__}


def project_disk(cache_bytes: float, model_bytes: float, *, models: int, patience: int) -> dict:
    """Step 6: bytes the run leaves on disk: the cache, every model once (the weights folder hard-links the work
    folder's), and the largest checkpoint set at a time (weights + Adam's two moments, + best weights with
    ``patience``); against :data:`KAGGLE_DISK_BYTES`."""
    checkpoints = model_bytes * (3 + (1 if patience > 0 else 0))
    total = cache_bytes + models * model_bytes + checkpoints
    return {"cache": round(cache_bytes), "models": round(models * model_bytes), "checkpoints": round(checkpoints),
            "total": round(total), "kaggle_limit": KAGGLE_DISK_BYTES, "fits_kaggle": bool(total < KAGGLE_DISK_BYTES)}


def plan_training(data_dir, ranges_path, config: ModelConfig, *, folds: int = 5, epochs: int = 10,
                  final: str = "ensemble", sample: int = 64, measure: int = 3, limit: int | None = None,
                  workers: int = 2, shared: bool = False, vertebrae=7, seed: int = 0,
                  studies: int | None = None, batch_size: int = 16, patience: int = 0,
                  timed_steps: int = 2) -> dict:
    """The projected cost of ``train`` on ``data_dir`` (see the module docstring).

    Steps: :func:`read_header_sample`, :func:`measure_cache`, :func:`project_epoch`, :func:`project_run`.

    Returns
    -------
    dict
        ``studies``, ``studies_read``, ``crops`` (total, per study), ``cache_bytes`` (raw, projected, per
        study), ``compression`` (measured ratio), ``cache_build_seconds``, ``input_crops_per_s``,
        ``epoch`` (crops per model per epoch, seconds per GPU, whether input-bound), ``run`` (models, GPU hours
        per GPU), ``assumptions``.
    """
    data_dir, ranges_path = Path(data_dir), Path(ranges_path)
    names = VERTEBRAE[: int(vertebrae)] if isinstance(vertebrae, int) else tuple(vertebrae)
    common = dict(folds=folds, seed=seed, vertebrae=names, shared=shared, final=final, limit=limit)
    labels = count_labels(data_dir, **common)
    memory = inference_memory(data_dir, config, **common)
    headers = read_header_sample(data_dir, ranges_path, config, sample=sample, limit=limit, workers=workers,
                                 seed=seed)
    read = headers.read
    crops_per_study = float(np.mean([sum(d["crops"] for d in r["vertebrae"].values()) for r in read.values()]))
    raw_per_study = float(np.mean([r["raw_bytes"] for r in read.values()]))
    n_total = int(studies) if studies else len(headers.uids)  # e.g. the full training set, from a downloaded subset
    n_ok = n_total * len(read) / len(headers.chosen)
    cache = measure_cache(data_dir, ranges_path, config, headers, measure=measure, workers=workers)
    ratio, build_s = cache["ratio"], cache["build_seconds_per_study"]
    epoch, train_share = project_epoch(n_ok, crops_per_study, config, cache["input_crops_per_s"], folds=folds,
                                       shared=shared)
    run = project_run(epoch, folds=folds, epochs=epochs, final=final, units=1 if shared else len(names))
    machine = time_training_step(config, batch_size=batch_size, steps=timed_steps) if timed_steps > 0 else None
    if machine:
        sec = max(epoch["crops_per_model"] / machine["crops_per_s"], epoch["cpu_input_seconds"])
        epoch["this_machine_seconds"] = sec
        run["this_machine_hours"] = run["models"] * epochs * sec / 3600.0 * (1 + 1 / (3 * epochs))
    model_bytes = machine["model_bytes"] if machine else 0
    disk = project_disk(raw_per_study * ratio * n_ok, model_bytes, models=run["models"], patience=patience)
    return {
        "data": str(data_dir), "config": {"head": config.head, "input_shape": list(config.input_shape),
                                          "channels": config.channels, "slices_per_vertebra": config.slices_per_vertebra},
        "studies": n_total, "studies_in_train_csv": len(headers.uids), "studies_read": len(read),
        "studies_failed": headers.failed,
        "slices_per_study": float(np.mean([r["n_slices"] for r in read.values()])),
        "crops": {"total": round(crops_per_study * n_ok), "per_study": crops_per_study},
        "cache_bytes": {"raw_int16": round(raw_per_study * n_ok), "projected": round(raw_per_study * ratio * n_ok),
                        "per_study": raw_per_study * ratio},
        "compression": {"ratio": ratio, "studies_measured": cache["studies_measured"]},
        "cache_build_seconds": {"per_study_one_core": build_s, "total": build_s * n_ok / max(workers, 1)},
        "input_crops_per_s": cache["input_crops_per_s"],
        "labels": labels,
        "inference_memory": {m: p.to_dict() for m, p in memory.items()},
        "inference_memory_summary": {m: p.summary() for m, p in memory.items()},
        "epoch": epoch,
        "run": run,
        "this_machine": machine,
        "disk_bytes": disk,
        "assumptions": _assumptions(config, train_share),
    }


def format_plan(plan: dict) -> str:
    """The plan as a few lines of text."""
    gb = 1e9
    e, r = plan["epoch"], plan["run"]
    lines = [
        f"{plan['studies']} studies ({plan['studies_read']} headers read, {plan['slices_per_study']:.0f} slices "
        f"each on average), config {plan['config']}",
        f"crops: {plan['crops']['total']} ({plan['crops']['per_study']:.0f} per study)",
        f"cache: {plan['cache_bytes']['projected'] / gb:.2f} GB projected ({plan['cache_bytes']['per_study'] / 1e6:.2f} "
        f"MB per study; raw int16 {plan['cache_bytes']['raw_int16'] / gb:.2f} GB, compression "
        f"{plan['compression']['ratio']:.2f} measured on {plan['compression']['studies_measured']} studies)",
        f"cache build: {plan['cache_build_seconds']['per_study_one_core']:.1f} s per study per core, about "
        f"{plan['cache_build_seconds']['total'] / 3600:.2f} h",
        f"input pipeline on this machine: {plan['input_crops_per_s']:.0f} crops/s" + _input_need(plan),
        f"one epoch of one model: {e['crops_per_model']} crops; input {e['cpu_input_seconds']:.0f} s",
    ]
    m = plan.get("this_machine")
    if m:
        lines.append(f"  this machine ({m['device']}, {m['replicas']} replica(s), XLA {'on' if m['xla'] else 'off'}): "
                     f"{m['seconds_per_step']:.2f} s per step of {m['batch']} crops ({m['crops_per_s']:.1f} crops/s, "
                     f"{m['steps']} steps timed): {e['this_machine_seconds']:.0f} s per epoch; whole run "
                     f"{r['this_machine_hours']:.1f} h")
    for g in GPU_TRAIN_224:
        if e.get(f"{g}_seconds") is None:
            lines.append(f"  {g}: no published figure for head {plan['config']['head']!r}")
            continue
        lines.append(f"  {g}: {e[f'{g}_seconds']:.0f} s per epoch{' (input-bound)' if e[f'{g}_input_bound'] else ''}; "
                     f"whole run ({r['models']} models x {r['epochs']} epochs) {r[f'{g}_hours']:.1f} GPU hours")
    d = plan["disk_bytes"]
    lines.append(f"disk: {d['total'] / gb:.1f} GB (cache {d['cache'] / gb:.1f}, {r['models']} models "
                 f"{d['models'] / gb:.1f}, checkpoints {d['checkpoints'] / gb:.1f}) of a Kaggle notebook's "
                 f"{d['kaggle_limit'] / gb:.0f} GB" + ("" if d["fits_kaggle"] else ": DOES NOT FIT (fewer folds, "
                                                          "--final refit, a smaller --input-size)"))
    lines += ["the shipped classifiers at inference on Kaggle:"]
    lines += [f"  {m}: {line}" for m, line in plan.get("inference_memory_summary", {}).items()]
    lines += format_label_counts(plan["labels"])
    lines += ["assumptions:"] + [f"  - {n}" for n in plan["assumptions"]["notes"]]
    lines += [f"  - {g}: {d['img_s']:.0f} img/s at 224 px ({d['precision']}): {d['source']}"
              for g, d in plan["assumptions"]["gpu"].items()]
    return "\n".join(lines)


def _input_need(plan: dict) -> str:
    """What the GPUs train on at the plan's input size, against the pipeline's crops/s (empty for the tiny head)."""
    cfg = plan["config"]
    if cfg.get("head") not in ("seed", "gap"):
        return ""
    scale = (224.0 / float(cfg["input_shape"][0])) ** 2
    need = {"one T4": GPU_TRAIN_224["T4"]["img_s"] * scale, "two T4s (at most)": 2 * GPU_TRAIN_224["T4"]["img_s"] * scale,
            "a P100": GPU_TRAIN_224["P100"]["img_s"] * scale}
    have = float(plan["input_crops_per_s"])
    return "; the GPUs train on " + ", ".join(
        f"{g} {n:.0f} ({'fed' if have >= n else 'INPUT-BOUND'})" for g, n in need.items())


def format_label_counts(labels: dict) -> list[str]:
    """Fractured / intact studies per vertebra and fold, as table lines (train side, then held out)."""
    if not labels:
        return []
    folds = list(next(iter(labels.values())))
    lines = ["fractured/intact studies per vertebra and fold (training studies; held out in brackets):",
             "  " + " " * 6 + "".join(f"{f:>18}" for f in folds)]
    for v, per in labels.items():
        cells = [f"{c['train_positive']}/{c['train_negative']} ({c['held_positive']}/{c['held_negative']})"
                 for c in per.values()]
        lines.append(f"  {v:<6}" + "".join(f"{c:>18}" for c in cells))
    return lines
