"""Per-stage cost of the submission pipeline against a naive baseline, and a projection for Kaggle.

:func:`run_benchmark` generates synthetic studies at the competition's scale (512x512, about 314 slices as at the
real median, mostly JPEG Lossless .4.70), or takes given study folders (e.g. the real necks ``write-study`` writes), then measures in
one run:

- ours, per stage and per study: header scan, planning, decoding only the planned slices, crop preparation,
  compiled batched scoring, aggregation, writing;
- end to end: a study's marginal cost inside real :func:`cspine_submit.submit.run.run_submission` runs (a run of all
  the studies minus a run of a few, per study), against merely decoding the same studies the naive way (pydicom's
  default plugins, file order, one process), both measured in each repeat, for each worker count asked;
- the naive baseline the way the seed notebook works: pydicom + pylibjpeg decoding every slice in file-name order
  in one process, preprocessing every slice, scoring one slice at a time with eager calls of every classifier;
- the decode stage against its own limit: the planned slices decoded with the fastest decoder called directly;
- CPU throughput of the classifier heads (crops/s);
- peak memory;
- a projection for the hidden test set on Kaggle (1500 studies, 2 CPU cores, 2x T4) with its assumptions: every
  ensemble member of every vertebra, on the GPU the score stage places it on, at the precision it picks there.

On the CPU both sides score with the ``tiny`` head (random weights), so the ratio measures the pipeline, not the
backbone; the heads' own throughput is reported separately.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cspine_submit.config import VERTEBRAE, ModelConfig

STAGES = ("scan", "plan", "decode", "crop", "score", "aggregate", "write", "end_to_end")
"""Stages reported per study, in pipeline order."""

KAGGLE_STUDIES = 1500
KAGGLE_CPU_WORKERS = 2
KAGGLE_GPUS = 2
KAGGLE_HOURS = 9.0
T4_RESNET50_224 = {("mixed_float16", False): 990.0, ("mixed_float16", True): 1150.0,
                   ("float32", False): 430.0, ("float32", True): 430.0}
"""ResNet50 images/s on one T4 at 224x224 by (precision, XLA) (NVIDIA's TensorFlow figures: 430 FP32, 990 mixed
precision, 1100-1200 mixed with XLA; no XLA figure for FP32 is published, so none is assumed)."""
TRAIN_DEFAULT_FOLDS = 5
"""`train`'s default --folds: the ensemble members per vertebra a trained weights folder holds. The projection of
the benchmark's random classifiers (one per vertebra) counts this many, as a real run would score."""

ASSUMED_EXTENT_MM = 210.0
"""Typical z-extent of a synthetic study (C1-C7 plus the head and chest margins), used to pick the slice spacing
that gives about the requested number of slices."""


def _timed(fn: Callable, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def make_studies(out_dir: Path, n_studies: int, size: int, slices: int, seed: int = 0) -> list[Path]:
    """Synthetic test studies at benchmark scale, all JPEG Lossless .4.70 but one in four uncompressed.

    Returns the study folders.
    """
    from cspine_submit.datasets.synthetic import generate_dataset

    spacing = ASSUMED_EXTENT_MM / max(int(slices), 1)
    ds = generate_dataset(
        out_dir, n_train=0, n_test=n_studies, seed=seed, size=size, spacing=(spacing, spacing),
        compressed_fraction=0.75, force=True,
    )
    return [r.folder for r in ds.test]


RANGES_FILE = Path("demo") / "slice_ranges.json"
"""Slice ranges the benchmark plans with, relative to ``weights/``: the ``profile`` ranges learned from synthetic
masks, because ``profile`` is what ``learn-ranges`` picks when it has images (the competition case), and its
image cue (decoding about one slice per 5 mm) is part of the cost to measure. The shipped default
``weights/slice_ranges.json`` (learned from two VerSe masks, without images) plans from headers alone."""


def make_weights(weights_dir: Path, config: ModelConfig, seed: int = 0) -> dict:
    """Seven classifiers of ``config.head`` with random weights, their config and the slice ranges to plan with
    (:data:`RANGES_FILE`).

    Returns ``{vertebra: keras.Model}``.
    """
    import keras

    from cspine_submit.score.models import build_classifier, save_classifier
    from cspine_submit.files import default_weights_dir

    keras.utils.set_random_seed(seed)
    weights_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for v in VERTEBRAE:
        models[v] = build_classifier(config.head, config.input_shape)
        save_classifier(models[v], weights_dir / config.classifier_paths(v)[0])
    config.to_json(weights_dir / "model_config.json")
    shutil.copyfile(default_weights_dir() / RANGES_FILE, weights_dir / "slice_ranges.json")
    return models


# ---------------------------------------------------------------------------------------------------------------
# Ours, stage by stage


def ours_per_study(folder: Path, ranges, config: ModelConfig, models: dict) -> tuple[dict, int]:
    """Our stages on one study, in this process, exactly as the submission runs them.

    The worker side is :func:`cspine_submit.submit.run.prepare_study` (its own per-stage seconds; ``plan`` includes
    decoding the image cue's slices when the ranges use the ``profile`` method), then the main process's scoring
    and aggregation. Returns ``({stage: seconds}, distinct slices decoded)``.
    """
    from cspine_submit.score import aggregate
    from cspine_submit.score.models import score
    from cspine_submit.submit.run import StudyJob, prepare_study

    prepared = prepare_study(StudyJob(folder.name, str(folder), ranges, config, VERTEBRAE))
    sec = {"scan": prepared.seconds["scan"], "plan": prepared.seconds["plan"],
           "decode": prepared.seconds["read"], "crop": prepared.seconds["crop"]}
    probs, sec["score"] = _timed(score, models, prepared.crops, config.batch_size)
    _, sec["aggregate"] = _timed(aggregate.aggregate_study, probs, config)
    return sec, int(prepared.slices_read)


def fastest_direct_loop(header, indices) -> str:
    """Decode slices ``indices`` of a scanned study with the fastest decoder called directly, nothing else.

    The floor the reader is compared against: JPEG Lossless through ``dicomsdl.open(path).copyFrameData`` (GDCM's
    ``ImageReader`` when dicomsdl is missing), uncompressed data with ``numpy.fromfile`` at the Pixel Data offset the
    scan found; no HU conversion, no checks, no fallback. Other syntaxes go through ``pydicom.pixels.pixel_array``
    with its preferred plugin. Returns the name of the JPEG decoder used.
    """
    from pydicom.pixels import pixel_array

    from cspine_submit.read import dicom

    from cspine_submit.read import pixels

    try:
        import dicomsdl
    except ImportError:
        dicomsdl = None
    import gdcm

    buffer = np.empty((header.rows, header.cols), dtype=np.int16)
    for i in indices:
        path, tsyntax = str(header.files[i]), header.transfer_syntaxes[i]
        spec = header.pixels[i] if i < len(header.pixels) else None
        route = pixels.direct_route(tsyntax, spec)
        if route == "native":
            np.fromfile(path, dtype=spec.dtype, count=spec.rows * spec.cols, offset=spec.fragments[0][0])
        elif route is not None and dicomsdl is not None:
            dicomsdl.open(path).copyFrameData(0, buffer)
        elif route is not None:
            reader = gdcm.ImageReader()
            reader.SetFileName(path)
            reader.Read()
            reader.GetImage().GetBuffer()
        else:
            plugins = [p for p in dicom.available_plugins(tsyntax) if p != "native"]
            pixel_array(path, decoding_plugin=plugins[0] if plugins else "")
    return "dicomsdl" if dicomsdl is not None else "gdcm"


def decode_limit(folder: Path, ranges, config: ModelConfig, rounds: int = 3) -> tuple[float, float, int]:
    """The planned slices of one study decoded by our reader and by the fastest decoder called directly.

    Each side is timed ``rounds`` times, alternating, and its fastest round is kept: both then read files already in
    the page cache with warm CPU caches, whichever went first.

    Returns ``(reader seconds, direct seconds, slices)``; the direct loop is :func:`fastest_direct_loop` (no header
    scan, no HU conversion, no checks): the floor our reader is compared against. The reader decodes as a run's
    workers do: :func:`cspine_submit.read.dicom.decode_into` each slice, into a stack of the study's
    :func:`cspine_submit.read.dicom.hu_dtype` that was already written once (workers reuse theirs from study to study;
    first-touch page faults of a fresh stack would cost about as much as reading uncompressed slices).
    """
    from cspine_submit.score import crop
    from cspine_submit.read import dicom
    from cspine_submit.localize import plan_crops

    header = dicom.scan_study(folder)
    needed = crop.slices_needed(plan_crops(header, ranges, config), config, header.n_slices)
    stack = np.zeros((len(needed), header.rows, header.cols), dtype=dicom.hu_dtype(header))

    def read() -> None:
        for k, i in enumerate(needed.tolist()):
            dicom.decode_into(header, i, stack[k])

    ours, direct = [], []
    for _ in range(max(int(rounds), 1)):
        ours.append(_timed(read)[1])
        direct.append(_timed(fastest_direct_loop, header, needed)[1])
    return min(ours), min(direct), int(len(needed))


def naive_decode_seconds(folder: Path) -> tuple[float, int]:
    """Decoding every slice of a study the naive way: ``pydicom.dcmread`` + ``pixel_array`` with pydicom's default
    plugins, file-name order, one process, to HU. Returns ``(seconds, slices)``."""
    import pydicom

    from cspine_submit.read.dicom import natural_key

    files = sorted((p for p in Path(folder).iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
    t = time.perf_counter()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    return time.perf_counter() - t, len(files)


def marginal_seconds(wall_all: float, wall_few: float, n: int, n_few: int = 1) -> dict:
    """Seconds per study of a submission run once it is going.

    ``wall_few`` (a run of ``n_few`` studies) is worker start-up, warm-up and the first studies' latency;
    ``wall_all`` (a run of ``n`` studies) is the same plus ``n - n_few`` study periods. Their difference over
    ``n - n_few`` is what each further study costs, i.e. what each of 1500 studies costs; the report entries of one
    run cannot tell it, because the workers prepare the next studies while the first is still starting.
    """
    per_study = (wall_all - wall_few) / (n - n_few) if n > n_few else wall_all
    per_study = max(per_study, 1e-9)
    return {"seconds_per_study": round(per_study, 3), "studies_per_s": round(1.0 / per_study, 3),
            "startup_s": round(wall_few - n_few * per_study, 3), "wall_s": round(wall_all, 3)}


def _linked_test_dir(root: Path, folders: list[Path]) -> Path:
    """A test folder of links to ``folders`` (a run over exactly those studies)."""
    root.mkdir(parents=True, exist_ok=True)
    for f in folders:
        link = root / f.name
        if not link.exists():
            link.symlink_to(Path(f).resolve(), target_is_directory=True)
    return root


def _spread(values: list[float]) -> dict:
    return {"median": round(float(np.median(values)), 4), "min": round(float(np.min(values)), 4),
            "max": round(float(np.max(values)), 4), "runs": [round(float(v), 4) for v in values]}


def run_vs_naive_decode(folders: list[Path], weights_dir: Path, root: Path, workers: int, *, n_few: int,
                        repeat: int = 1, say: Callable[[str], None] = lambda _m: None) -> dict:
    """A study's marginal cost inside real submission runs against merely decoding it the naive way, same studies.

    Each repeat runs :func:`cspine_submit.submit.run.run_submission` on the first ``n_few`` studies and on all of
    them (marginal cost per study = wall time difference / study difference, :func:`marginal_seconds`), then
    decodes every slice of the same studies with :func:`naive_decode_seconds`. Measuring both in every repeat keeps
    the machine's load alike on both sides of the ratio. Also reports the main process's own CPU seconds per
    study (user + system, marginal like the wall time; it includes scoring, which runs on the CPU here) and the
    mean scoring wall seconds per study from the run report.

    Returns
    -------
    dict
        ``marginal_s``, ``naive_decode_s``, ``ratio`` (naive / marginal), ``main_cpu_s``: each
        ``{"median", "min", "max", "runs"}``; ``score_s`` (median over repeats); ``workers``, ``n``, ``n_few``.
    """
    from cspine_submit.submit.run import prepare_run, run_submission

    n = len(folders)
    n_few = max(1, min(int(n_few), n - 1))
    setup_all = prepare_run(_linked_test_dir(root / "all", folders), None, weights_dir)
    setup_few = prepare_run(_linked_test_dir(root / "few", folders[:n_few]), None, weights_dir)

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    marginal, naive, ratio, main_cpu, score = [], [], [], [], []
    for r in range(repeat):
        say(f"run {n_few} and {n} studies with {workers} worker(s), then naive decode ({r + 1}/{repeat})")
        c0 = cpu()
        _, wall_few = _timed(run_submission, setup_few, root / f"few_w{workers}.csv", workers=workers,
                             progress=False)
        c1 = cpu()
        res, wall_all = _timed(run_submission, setup_all, root / f"all_w{workers}.csv", workers=workers,
                               progress=False)
        c2 = cpu()
        m = marginal_seconds(wall_all, wall_few, n, n_few)["seconds_per_study"]
        naive_s = float(np.mean([naive_decode_seconds(f)[0] for f in folders]))
        marginal.append(m)
        naive.append(naive_s)
        ratio.append(naive_s / m)
        main_cpu.append(max(((c2 - c1) - (c1 - c0)) / (n - n_few), 0.0))
        score.append(res.totals["seconds_by_stage"].get("score", 0.0) / max(res.totals["ok"], 1))
    return {"workers": workers, "n": n, "n_few": n_few, "marginal_s": _spread(marginal),
            "naive_decode_s": _spread(naive), "ratio": _spread(ratio), "main_cpu_s": _spread(main_cpu),
            "score_s": round(float(np.median(score)), 4)}


# ---------------------------------------------------------------------------------------------------------------
# The naive baseline


def naive_per_study(folder: Path, config: ModelConfig, models: dict) -> tuple[dict, int]:
    """The seed notebook's way: every slice, file-name order, pylibjpeg, one slice and one model call at a time.

    Returns ``({stage: seconds}, slices decoded)``. Every slice is preprocessed whole (no localization: the naive
    pipeline does not know where the vertebrae are) and scored by all seven classifiers with eager calls.
    """
    import pydicom

    from cspine_submit.score import aggregate

    from cspine_submit.score import crop
    from cspine_submit.localize import CropPlan

    sec = dict.fromkeys(("scan", "plan", "decode", "crop", "score", "aggregate"), 0.0)
    t = time.perf_counter()
    files = sorted(Path(folder).glob("*.dcm"), key=lambda p: int(p.stem))
    sec["scan"] = time.perf_counter() - t
    probs = {v: [] for v in VERTEBRAE}
    for path in files:
        t = time.perf_counter()
        ds = pydicom.dcmread(path)
        ds.pixel_array_options(decoding_plugin="pylibjpeg")
        hu = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        sec["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        whole = CropPlan("slice", (0,), (0, 0, hu.shape[0], hu.shape[1]))
        x = crop.prepare_crops(hu[None], np.array([0]), whole, config)
        sec["crop"] += time.perf_counter() - t
        t = time.perf_counter()
        for v in VERTEBRAE:
            probs[v].append(float(np.asarray(models[v](x, training=False))[0, 0]))
        sec["score"] += time.perf_counter() - t
    _, sec["aggregate"] = _timed(aggregate.aggregate_study, {v: np.array(p) for v, p in probs.items()}, config)
    return sec, len(files)


# ---------------------------------------------------------------------------------------------------------------
# Heads, memory, projection


def head_throughput(heads: list[str], input_size: int, channels: int, batch_size: int, batches: int = 2) -> dict:
    """CPU crops/s of each head with the compiled batched path (after one warm-up batch)."""
    import keras

    from cspine_submit.score.models import build_classifier, predict

    out = {}
    for head in heads:
        keras.utils.set_random_seed(0)
        model = build_classifier(head, (input_size, input_size, channels))
        x = np.random.default_rng(0).random((batch_size, input_size, input_size, channels), dtype=np.float32)
        predict(model, x, batch_size)  # warm-up: tracing is not throughput
        t = time.perf_counter()
        for _ in range(batches):
            predict(model, x, batch_size)
        sec = time.perf_counter() - t
        out[head] = {"input": [input_size, input_size, channels], "batch": batch_size,
                     "crops_per_s": round(batches * batch_size / sec, 2), "params": int(model.count_params())}
        del model
        keras.backend.clear_session()
    return out


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process's own address space, MB (Linux ``VmHWM``).

    Not ``getrusage``: Linux carries ``ru_maxrss`` over fork and exec, so a spawned worker would report its
    parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prepare_and_measure(job) -> float:
    """Worker entry point: prepare one study as the pipeline's workers do, return the worker's peak memory (MB)."""
    from cspine_submit.submit.run import prepare_study

    prepare_study(job)
    return _vm_hwm_mb()


def worker_peak_mb(folder: Path, ranges, config: ModelConfig) -> float:
    """Peak memory of a fresh (spawned) worker process preparing one study, MB."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cspine_submit.submit.run import StudyJob

    job = StudyJob(folder.name, str(folder), ranges, config, VERTEBRAE)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_prepare_and_measure, job).result()


@dataclass(frozen=True)
class GpuWorkload:
    """Classifier passes per study on each GPU, placed as the score stage places them.

    Attributes
    ----------
    passes : tuple of int
        Image passes (crop x ensemble member) per study on each GPU.
    members : {vertebra: int}
        Ensemble members scoring each vertebra's crops.
    placement : str
        Which vertebrae run on which GPU, for the assumptions.
    input_size : int
        Side of the model input, pixels.
    precision : str
        ``mixed_float16`` or ``float32`` (a T4 runs float16 fast: what the score stage picks there).
    xla : bool
        Whether scoring is XLA-compiled (the score stage does not compile it today).
    members_from : str
        Where the ensemble size comes from (the weights folder, or a stand-in count).
    """

    passes: tuple[int, ...]
    members: dict
    placement: str
    input_size: int
    precision: str
    xla: bool = False
    members_from: str = "the weights folder's model_config.json"


def gpu_workload(config: ModelConfig, weights_dir: Path | None = None, *, n_gpus: int = KAGGLE_GPUS,
                 members: int | None = None, xla: bool = False) -> GpuWorkload:
    """What one study costs the GPUs: every ensemble member of every vertebra, on the device it is placed on.

    Placed as the score stage places them on two T4s: by the memory plan (:func:`cspine_submit.score.memory.
    plan_memory`, T4 memory): an ensemble's members spread over the GPUs by the crops they score, a network shared
    by every vertebra replicated with each study's crops split, seven single classifiers round-robin (4:3).
    ``members`` replaces the folder's ensemble size (the benchmark's random classifiers stand for a
    :data:`TRAIN_DEFAULT_FOLDS`-fold ensemble).
    """
    from cspine_submit.score.memory import GiB, DeviceMemory, file_groups, known_gpu_memory, plan_memory

    devices = tuple(f"GPU:{k}" for k in range(max(int(n_gpus), 1)))
    if members:
        config = config.replace(classifier_files={
            v: tuple(f"{'+'.join(files)}#{i}" for i in range(int(members))) for files, vs in file_groups(config)
            for v in vs})
    precision = "mixed_float16" if config.mixed_precision else "float32"
    t4 = known_gpu_memory("T4")[0]
    plan = plan_memory(config, [DeviceMemory(d, t4, "GPU", "T4") for d in devices], precision=precision,
                       host_usable=13 * GiB)
    work = plan.work_per_device(config.slices_per_vertebra)
    passes = [work[d] for d in devices]
    n_members = {v: len(g.files) for g in plan.groups for v in g.vertebrae}
    placement = f"{plan.placement} (memory plan{'' if plan.fits else ': DOES NOT FIT'}): " + "; ".join(
        f"{','.join(_on_device(g, d) for g in plan.groups if d in g.devices) or 'nothing'} on {d}" for d in devices)
    source = (f"train's default --folds {TRAIN_DEFAULT_FOLDS}, counted for the stand-in classifiers measured here"
              if members else "the weights folder's model_config.json")
    return GpuWorkload(passes=tuple(passes), members=n_members, placement=placement, input_size=config.input_size,
                       precision=precision, xla=xla, members_from=source)


def _on_device(group, device: str) -> str:
    """``C1,C3`` (a whole network), ``C1,...,C7 (3 of 5 members)``, ``C1,...,C7 (a share of the crops)``."""
    names = ",".join(group.vertebrae)
    if group.mode == "replicas":
        return f"{names} (a share of the crops)"
    n = group.devices.count(device) if group.mode != "whole" else len(group.files)
    return names if n == len(group.files) == 1 else f"{names} ({n} of {len(group.files)} members)"


def kaggle_projection(cpu_stage_seconds: float, main_seconds: float, workload: GpuWorkload) -> dict:
    """Projected wall time of the hidden test set on Kaggle.

    Parameters
    ----------
    cpu_stage_seconds : float
        Worker-side seconds per study measured here (scan + plan + decode + crop).
    main_seconds : float
        Main-process CPU seconds per study besides the GPU (aggregation, writing), measured here.
    workload : GpuWorkload
        Classifier passes per study on each GPU (:func:`gpu_workload`).
    """
    per_gpu = T4_RESNET50_224[(workload.precision, workload.xla)] * (224.0 / workload.input_size) ** 2
    cpu = cpu_stage_seconds / KAGGLE_CPU_WORKERS
    # The GPUs score their classifiers concurrently: the busiest one sets the GPU time of a study.
    gpu = max(workload.passes) / per_gpu
    # Workers prepare study i+1 while the GPUs score study i: the slower side sets the pace.
    per_study = max(cpu, gpu) + main_seconds
    total_h = per_study * KAGGLE_STUDIES / 3600.0
    members = sorted(set(workload.members.values()))
    crops = sum(workload.passes)
    return {
        "seconds_per_study": round(per_study, 3),
        "cpu_seconds_per_study": round(cpu, 3),
        "gpu_seconds_per_study": round(gpu, 4),
        "gpu_passes_per_study": list(workload.passes),
        "total_hours": round(total_h, 3),
        "limit_hours": KAGGLE_HOURS,
        "assumptions": [
            f"{KAGGLE_STUDIES} studies like the benchmark's (size, slices, share of .4.70)",
            f"CPU stages measured here, split over {KAGGLE_CPU_WORKERS} worker processes (Kaggle's 2 cores are "
            "assumed as fast as this machine's)",
            f"ResNet50 at {T4_RESNET50_224[(workload.precision, workload.xla)]:g} img/s per T4 at 224x224 "
            f"({workload.precision}, XLA {'on' if workload.xla else 'off'}; NVIDIA), scaled by pixels to "
            f"{workload.input_size}x{workload.input_size}: {per_gpu:.0f} img/s per T4, whatever the head measured here",
            f"{crops} classifier passes per study: {'/'.join(map(str, members))} ensemble member(s) per vertebra "
            f"({workload.members_from}) x the crops; placed {workload.placement} (passes {list(workload.passes)}); the busiest GPU sets the "
            "pace",
            "decoding overlaps scoring, so the slower of the two sets the pace",
        ],
    }


# ---------------------------------------------------------------------------------------------------------------
# The whole run


@dataclass(frozen=True)
class BenchOptions:
    """What :func:`run_benchmark` measures.

    Attributes
    ----------
    n_studies : int, optional
        Studies to measure: synthetic ones generated (default 3), or the first of ``studies_dir`` (default all).
    size : int
        Rows = columns of each synthetic slice, pixels.
    slices : int
        About this many slices per synthetic study.
    input_size : int
        Classifier input side (pixels) of the random classifiers (ignored with ``weights``).
    heads : tuple of str
        Heads whose CPU throughput to measure (none when empty).
    work_dir : path, optional
        Keep the generated studies and outputs here (default: a temporary folder, removed afterwards).
    naive : bool
        Measure the naive baseline too.
    studies_dir : path, optional
        Measure these study folders (e.g. ``write-study``'s ``images/``) instead of generating synthetic ones.
    weights : path, optional
        A weights folder (e.g. ``weights/demo``): its classifiers, config and slice ranges; default seven random
        ``tiny`` classifiers at ``input_size`` planned with :data:`RANGES_FILE`.
    workers : tuple of int
        Worker counts for the end-to-end runs.
    n_few : int, optional
        Studies of the short run the marginal cost is taken against (default: a fifth, at least 1).
    repeat : int
        End-to-end measurements per worker count (medians and spread are reported).
    xla : bool
        Project the Kaggle run with XLA-compiled scoring (the score stage does not compile it today).
    """

    n_studies: int | None = None
    size: int = 512
    slices: int = 314  # the real training studies' median (2019 studies)
    input_size: int = 256
    heads: tuple[str, ...] = ("tiny", "gap")
    work_dir: str | Path | None = None
    naive: bool = True
    studies_dir: str | Path | None = None
    weights: str | Path | None = None
    workers: tuple[int, ...] = (1, 2)
    n_few: int | None = None
    repeat: int = 1
    xla: bool = False


@dataclass
class _Inputs:
    """The studies and weights one benchmark measures."""

    folders: list[Path]
    weights_dir: Path
    config: ModelConfig
    models: dict
    ranges: object


def run_benchmark(options: BenchOptions | None = None, *, progress: Callable[[str], None] | None = None) -> dict:
    """Run every measurement; returns the results as a JSON-able dict.

    Parameters
    ----------
    options : BenchOptions, optional
        What to measure (default: ``BenchOptions()``).
    progress : callable, optional
        Called with a line of text before each long step.

    Returns
    -------
    dict
        ``ours`` / ``naive`` / ``ratio`` (``{stage: seconds per study}``, ratio = naive / ours), ``decode``
        (slices/s and the direct-decoder limit), ``end_to_end`` (by worker count: marginal seconds per study in real
        runs against the naive decode of the same studies, see :func:`run_vs_naive_decode`), ``heads`` (crops/s),
        ``memory``, ``projection``, ``studies`` (slice counts), ``machine``.
    """
    opts = options or BenchOptions()
    say = progress or (lambda _msg: None)
    own_tmp = opts.work_dir is None
    root = Path(tempfile.mkdtemp(prefix="cspine-bench-")) if own_tmp else Path(opts.work_dir)
    try:
        inputs = bench_inputs(opts, root, say)
        # Warm up TensorFlow (tracing, thread pools) outside the timed runs, for both sides.
        ours_per_study(inputs.folders[0], inputs.ranges, inputs.config, inputs.models)
        ours, decoded, end_to_end = stage_costs(inputs, opts, root, say)
        decode, headers = decode_costs(inputs, decoded, say)
        naive_res = naive_costs(inputs, ours, say) if opts.naive else None
        heads_res = {}
        if opts.heads:
            say("classifier heads on this CPU")
            heads_res = head_throughput(list(opts.heads), inputs.config.input_size, inputs.config.n_channels,
                                        batch_size=8)
        return benchmark_report(opts, inputs, ours=ours, naive=naive_res, decode=decode, end_to_end=end_to_end,
                                heads=heads_res, headers=headers)
    finally:
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)


def bench_inputs(opts: BenchOptions, root: Path, say: Callable[[str], None]) -> _Inputs:
    """The study folders (given or generated into ``root / "data"``) and the weights to score them with."""
    from cspine_submit.submit.run import load_models, load_ranges_for

    if opts.studies_dir is not None:
        folders = sorted(p for p in Path(opts.studies_dir).iterdir() if p.is_dir())[:opts.n_studies or None]
        if len(folders) < 2:
            raise ValueError(f"{opts.studies_dir}: the benchmark needs at least 2 study folders")
    else:
        n_studies = opts.n_studies or 3
        say(f"generating {n_studies} synthetic studies ({opts.size}x{opts.size}, ~{opts.slices} slices) in {root}")
        folders = make_studies(root / "data", n_studies, opts.size, opts.slices)
    if opts.weights is not None:
        weights_dir = Path(opts.weights)
        config, models, _ = load_models(weights_dir)
    else:
        config = ModelConfig(head="tiny", input_size=opts.input_size, trained_on="untrained",
                             source="benchmark: random tiny classifiers")
        weights_dir = root / "weights"
        models = make_weights(weights_dir, config)
    ranges, _, _ = load_ranges_for(weights_dir)
    return _Inputs(folders, weights_dir, config, models, ranges)


def stage_costs(inputs: _Inputs, opts: BenchOptions, root: Path, say: Callable[[str], None]
                ) -> tuple[dict, list[int], dict]:
    """Ours, stage by stage (mean seconds per study), and end to end in real runs for each worker count.

    Returns ``(ours, decoded slices per study, end_to_end)``; ``ours["end_to_end"]`` is the best worker count's
    median marginal seconds per study.
    """
    from cspine_submit.submit import submission
    from cspine_submit.submit.run import prepare_run

    say("ours, stage by stage")
    ours_rows, decoded = [], []
    for f in inputs.folders:
        sec, n = ours_per_study(f, inputs.ranges, inputs.config, inputs.models)
        ours_rows.append(sec)
        decoded.append(n)
    setup = prepare_run(_linked_test_dir(root / "all", inputs.folders), None, inputs.weights_dir)
    probabilities = {rid: 0.5 for rid in setup.plan.row_ids}
    _, write_s = _timed(submission.write_submission, root / "write_test.csv", setup.plan.row_ids, probabilities)
    ours = {k: float(np.mean([r[k] for r in ours_rows])) for k in ours_rows[0]}
    ours["write"] = write_s / len(inputs.folders)

    n_few = opts.n_few or max(1, len(inputs.folders) // 5)
    end_to_end = {}
    for w in opts.workers:
        end_to_end[f"workers_{w}"] = run_vs_naive_decode(inputs.folders, inputs.weights_dir, root, w, n_few=n_few,
                                                         repeat=opts.repeat, say=say)
    best = min(end_to_end.values(), key=lambda e: e["marginal_s"]["median"])
    ours["end_to_end"] = best["marginal_s"]["median"]
    return ours, decoded, end_to_end


def decode_costs(inputs: _Inputs, decoded: list[int], say: Callable[[str], None]) -> tuple[dict, list]:
    """The decode stage against the fastest decoder called directly. Returns ``(decode, scanned headers)``."""
    from cspine_submit.read import dicom

    say("decode stage against the fastest decoder called directly")
    folders = inputs.folders
    lim = [decode_limit(f, inputs.ranges, inputs.config) for f in folders]
    reader_s, direct_s, n_planned = (float(sum(x[i] for x in lim)) for i in range(3))
    headers = [dicom.scan_study(f) for f in folders]
    n_total = sum(h.n_slices for h in headers)
    decode = {
        "planned_slices_per_study": round(n_planned / len(folders), 1),
        "all_slices_per_study": round(n_total / len(folders), 1),
        "decoded_slices_per_study": round(float(np.mean(decoded)), 1),
        "reader_slices_per_s": round(n_planned / reader_s, 1),
        "direct_slices_per_s": round(n_planned / direct_s, 1),
        "reader_over_direct": round(reader_s / direct_s, 3),
    }
    return decode, headers


def naive_costs(inputs: _Inputs, ours: dict, say: Callable[[str], None]) -> dict:
    """The naive baseline's mean seconds per study by stage (writing taken as ours: the same writer)."""
    say("naive baseline")
    rows = []
    for f in inputs.folders:
        t = time.perf_counter()
        sec, _ = naive_per_study(f, inputs.config, inputs.models)
        sec["write"] = ours["write"]  # the same writer: writing is not what the baseline is about
        sec["end_to_end"] = time.perf_counter() - t + sec["write"]
        rows.append(sec)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def benchmark_report(opts: BenchOptions, inputs: _Inputs, *, ours: dict, naive: dict | None, decode: dict,
                     end_to_end: dict, heads: dict, headers: list) -> dict:
    """The JSON-able result of :func:`run_benchmark`: the measurements, ratios, memory, projection, machine."""
    import os
    import platform

    config = inputs.config
    ratio = {k: (round(naive[k] / ours[k], 2) if ours.get(k) else None) for k in STAGES} if naive else None
    cpu = sum(ours[k] for k in ("scan", "plan", "decode", "crop"))
    # Random classifiers stand for a trained folder: TRAIN_DEFAULT_FOLDS members each; given weights count theirs.
    workload = gpu_workload(config, inputs.weights_dir, members=None if opts.weights else TRAIN_DEFAULT_FOLDS,
                            xla=opts.xla)
    projection = kaggle_projection(cpu, ours["aggregate"] + ours["write"], workload)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "ours": {k: round(ours[k], 4) for k in STAGES},
        "naive": {k: round(naive[k], 4) for k in STAGES} if naive else None,
        "ratio": ratio,
        "decode": decode,
        "end_to_end": end_to_end,
        "heads": heads,
        "memory": {"main_mb": round(_vm_hwm_mb(), 1),
                   "worker_mb": round(worker_peak_mb(inputs.folders[0], inputs.ranges, config), 1)},
        "projection": projection,
        "studies": {"n": len(inputs.folders), "source": str(opts.studies_dir) if opts.studies_dir else "synthetic",
                    "size": headers[0].rows, "slices": [h.n_slices for h in headers],
                    "compressed": [h.transfer_syntaxes[0] for h in headers]},
        "weights": str(opts.weights) if opts.weights else f"random {config.head} heads",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_1_5_15": [round(x, 2) for x in load] if load else None},
    }
