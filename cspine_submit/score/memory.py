"""The device memory plan: what each device must hold to score (or train) a config's classifiers, and where they go.

From a :class:`~cspine_submit.config.ModelConfig` (architecture, input size, channels, batch, precision, the files
of each vertebra: ensemble members and networks shared by several vertebrae) and the devices' memory, count

- **weights**: every distinct classifier file is loaded once; Keras keeps variables in float32 under either policy
  (4 bytes a parameter, :func:`parameter_count` gives the architecture's count without building it);
- **mixed-precision copies**: under ``mixed_float16`` each layer casts its kernel to float16 on every call, so a
  running member briefly holds a float16 copy of its weights (2 bytes a parameter; the seed head's 134M-parameter
  Dense kernel is most of it);
- **activations**: the peak of the feature maps alive at once for one image (:func:`activation_elements`, from a
  liveness count over the Keras graph, checked against it in the tests) times the batch, 2 or 4 bytes each, plus
  the input batch (uint16 codes and their float copy) and, on a GPU, a fixed allowance for cuDNN's scratch space.

and pick the first placement that fits (:func:`plan_memory`):

1. resident: every member's weights on a device for the whole run; with several devices an ensemble's members are
   spread over them (balanced by bytes), a single network shared by every vertebra is replicated on each (each
   study's batches split between them), else whole networks go round-robin; a smaller batch is tried before giving
   up residency;
2. in turn: the weights stay in host memory and each member is copied to the device for its call (one member on a
   device at a time; slower by the copies, fits where residency does not, needs the host memory);
3. nothing fits: :class:`MemoryPlanError`, with the numbers and the options (``--final refit``, the gap head,
   fewer folds).

Device memory: TensorFlow's own limit for each GPU where it gives one, else the documented usable memory of the
GPU named (:data:`KNOWN_GPUS`: T4, P100), else :data:`DEFAULT_GPU_BYTES`; logical CPU devices share the host's
memory. Only numbers and names go in: the planner is a pure function (:func:`plan_memory`) the tests hit without a
GPU; :func:`device_memory` asks TensorFlow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cspine_submit.config import VERTEBRAE, ModelConfig

GiB = 1024**3
MiB = 1024**2

KNOWN_GPUS: dict[str, tuple[int, int]] = {
    "T4": (16 * GiB, 15 * GiB),
    "P100": (16 * GiB, 15 * GiB),
}
"""``{name part: (total bytes, usable bytes)}``: the two Kaggle GPUs. Both are 16 GB cards; about 1 GiB goes to the
CUDA context, cuDNN/cuBLAS handles and what TensorFlow's allocator leaves free (a Kaggle T4 shows 15,360 MiB in
``nvidia-smi``; TensorFlow reports about 14.7 GiB for it), so 15 GiB is planned with."""

DEFAULT_GPU_BYTES = 15 * GiB
"""Usable memory assumed for a GPU that is neither in :data:`KNOWN_GPUS` nor reported by TensorFlow."""

GPU_WORKSPACE_BYTES = 256 * MiB
"""Per GPU: cuDNN's convolution scratch space and the allocator's fragmentation, beyond the counted tensors."""

FLOAT32_BYTES, FLOAT16_BYTES, UINT16_BYTES = 4, 2, 2


class MemoryPlanError(ValueError):
    """No placement fits the devices' memory. ``plan`` holds the numbers (a :class:`MemoryPlan` with
    ``fits=False``); the message lists them and the options. A ``ValueError``: a run's set-up treats it like
    weights that cannot be loaded (``submit`` writes the priors and exits 3)."""

    def __init__(self, plan: "MemoryPlan"):
        self.plan = plan
        super().__init__(plan.refusal())


class DeviceOutOfMemoryError(ValueError):
    """A device ran out of memory while classifiers were loaded (TensorFlow's ``ResourceExhaustedError``, turned into
    a ``ValueError`` naming the device and files, so a run's set-up gives those vertebrae their priors)."""


# --------------------------------------------------------------------------------------------------------------
# What one network costs


def _resnet50_sizes(size: int) -> tuple[int, int]:
    """Spatial sides of ResNet50's stage-1 maps (after conv1 + max pool) and of its last (conv5) output."""
    s = (size + 6 - 7) // 2 + 1  # ZeroPadding(3) + 7x7 stride-2 valid conv
    s = (s + 2 - 3) // 2 + 1  # ZeroPadding(1) + 3x3 stride-2 max pool
    stage1 = s
    for _ in range(3):  # conv3, conv4, conv5 stages each halve (1x1 stride-2 convs, rounding up)
        s = (s - 1) // 2 + 1
    return stage1, s


_RESNET50_NOTOP_3CH = 23_587_712  # keras.applications.ResNet50(include_top=False) at 3 channels, BN statistics included
_TINY_FILTERS = (16, 32, 64, 96)


def parameter_count(head: str, input_shape: Sequence[int]) -> int:
    """Parameters of an architecture of :data:`cspine_submit.score.architectures.ARCHITECTURES`, without building it.

    Parameters
    ----------
    head : {"seed", "gap", "tiny"}
    input_shape : (height, width, channels)

    Returns
    -------
    int
        What ``build_classifier(head, input_shape).count_params()`` returns (the tests compare): the seed head at
        512x512x1 has 157,799,681.

    Raises
    ------
    ValueError
        A head this counter does not know.
    """
    h, w, c = (int(v) for v in input_shape)
    if head in ("seed", "gap"):
        backbone = _RESNET50_NOTOP_3CH - 7 * 7 * 64 * (3 - c)  # conv1's kernel is the only channel-dependent one
        if head == "gap":
            return backbone + 2048 + 1
        _, last_h = _resnet50_sizes(h)
        _, last_w = _resnet50_sizes(w)
        flat = last_h * last_w * 2048
        return backbone + flat * 256 + 256 + 256 + 1
    if head == "tiny":
        total, cin = 0, c
        for f in _TINY_FILTERS:
            total += 9 * cin * f + 4 * f  # bias-free 3x3 conv + BatchNormalization (gamma, beta, mean, variance)
            cin = f
        return total + cin + 1
    raise ValueError(f"no parameter count for head {head!r}; known: ['gap', 'seed', 'tiny']")


def activation_elements(head: str, input_shape: Sequence[int]) -> int:
    """Peak number of activation values alive at once for ONE image at inference.

    ResNet50 peaks in its first stage: a block's input kept for the shortcut, its last conv's output and the sum,
    three maps of 256 channels at a quarter of the input side. The tiny net peaks at its first conv: two 16-channel
    maps at full size. Counted by a liveness pass over the Keras graph (:func:`graph_peak_elements`; the tests check
    these closed forms against it).
    """
    h, w, c = (int(v) for v in input_shape)
    if head in ("seed", "gap"):
        return 3 * 256 * _resnet50_sizes(h)[0] * _resnet50_sizes(w)[0]
    if head == "tiny":
        return 2 * _TINY_FILTERS[0] * h * w
    raise ValueError(f"no activation count for head {head!r}; known: ['gap', 'seed', 'tiny']")


def graph_peak_elements(model) -> int:
    """Peak of the per-image activation values alive at once when ``model``'s graph runs layer by layer in order.

    A tensor is alive from the layer that makes it to the last layer that reads it; the peak over the layers of the
    sum of the alive tensors' sizes (batch axis excluded). An estimate of what an executor holds (it may fuse or
    reorder), used to check :func:`activation_elements`.
    """
    import numpy as np

    made: dict[int, tuple[int, int]] = {}
    last_use: dict[int, int] = {}
    ops = model.operations
    for i, op in enumerate(ops):
        for node in op._inbound_nodes:
            for t in node.input_tensors:
                last_use[id(t)] = i
            for t in node.outputs:
                made[id(t)] = (i, int(np.prod(t.shape[1:])))
    return max(sum(size for key, (start, size) in made.items() if start <= i <= last_use.get(key, start))
               for i in range(len(ops)))


@dataclass(frozen=True)
class NetworkBytes:
    """What one classifier file costs on a device, bytes.

    Attributes
    ----------
    params : int
    weights : int
        Resident float32 variables.
    cast_copy : int
        The float16 copy a call makes under ``mixed_float16`` (0 in float32).
    per_image : int
        Activations and the input for one image in the batch.
    """

    params: int
    weights: int
    cast_copy: int
    per_image: int

    def call(self, batch: int) -> int:
        """Transient bytes of one call on ``batch`` images."""
        return self.cast_copy + batch * self.per_image


def network_bytes(config: ModelConfig, precision: str) -> NetworkBytes:
    """:class:`NetworkBytes` of one of ``config``'s classifiers under the Keras dtype policy ``precision``."""
    shape = config.input_shape
    params = parameter_count(config.head, shape)
    half = precision == "mixed_float16"
    act = FLOAT16_BYTES if half else FLOAT32_BYTES
    pixels = shape[0] * shape[1] * shape[2]
    # The input arrives as uint16 codes and is cast to float32 (and to float16 under mixed precision) on the device.
    per_image = activation_elements(config.head, shape) * act + pixels * (UINT16_BYTES + FLOAT32_BYTES + (2 if half else 0))
    return NetworkBytes(params=params, weights=params * FLOAT32_BYTES, cast_copy=params * FLOAT16_BYTES if half else 0,
                        per_image=per_image)


# --------------------------------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True)
class DeviceMemory:
    """One device the classifiers may use.

    Attributes
    ----------
    name : str
        TensorFlow device name (``/device:GPU:0``) or any label.
    usable : int
        Bytes the classifiers may take.
    kind : "GPU" or "CPU"
    source : str
        Where ``usable`` comes from (TensorFlow, the table of known GPUs, an assumption, the host's memory).
    """

    name: str
    usable: int
    kind: str = "GPU"
    source: str = ""


def known_gpu_memory(device_name: str) -> tuple[int, str]:
    """Usable bytes of a GPU named ``device_name`` (e.g. ``Tesla T4``) from :data:`KNOWN_GPUS`, and why."""
    for part, (total, usable) in KNOWN_GPUS.items():
        if part.lower() in device_name.lower():
            return usable, f"{part}: {usable / GiB:.0f} GiB usable of {total / GiB:.0f} GiB (documented default)"
    return DEFAULT_GPU_BYTES, f"{device_name}: not a known GPU, {DEFAULT_GPU_BYTES / GiB:.0f} GiB assumed"


def host_available_bytes() -> int:
    """The host's available memory (``MemAvailable`` of ``/proc/meminfo``, else the physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def device_memory(devices: Sequence[str], names: Sequence[str] = ()) -> list[DeviceMemory]:
    """The memory of TensorFlow logical devices (``DevicePlan.devices``).

    A GPU: the memory limit TensorFlow's allocator has for it (``device_lib``; a logical GPU given a
    ``memory_limit`` reports that), else :func:`known_gpu_memory` of its name (``names``, as
    ``DevicePlan.names``). Logical CPU devices: the host's available memory shared evenly.
    """
    limits: dict[str, int] = {}
    if any("GPU" in d.upper() for d in devices):
        try:  # the only TensorFlow call that reports a GPU's memory; private, so guarded
            from tensorflow.python.client import device_lib

            limits = {d.name: int(d.memory_limit) for d in device_lib.list_local_devices() if d.device_type == "GPU"}
        except Exception:  # noqa: BLE001 - fall back to the documented defaults
            limits = {}
    cpus = [d for d in devices if "GPU" not in d.upper()]
    out = []
    for i, d in enumerate(devices):
        if "GPU" in d.upper():
            if limits.get(d):
                out.append(DeviceMemory(d, limits[d], "GPU", "TensorFlow's memory limit for this GPU"))
            else:
                usable, why = known_gpu_memory(names[i] if i < len(names) else d)
                out.append(DeviceMemory(d, usable, "GPU", why))
        else:
            host = host_available_bytes()
            out.append(DeviceMemory(d, host // len(cpus), "CPU", f"host memory available ({host / GiB:.1f} GiB) "
                                    f"shared by {len(cpus)} logical CPU device(s)"))
    return out


# --------------------------------------------------------------------------------------------------------------
# Placement


@dataclass(frozen=True)
class GroupPlacement:
    """Where the network of one group of vertebrae (the same files) runs.

    Attributes
    ----------
    vertebrae : tuple of str
    files : tuple of str
        The group's classifier files (several: an ensemble averaged).
    mode : {"whole", "replicas", "members", "in turn"}
        ``whole``: one model (one graph averaging the members) on ``devices[0]``; ``replicas``: that model on each of
        ``devices``, each study's batches split between them; ``members``: member ``i`` on ``devices[i]``, their
        probabilities averaged on the host; ``in turn``: as ``members``, with the weights kept in host memory and
        copied to the device for each call.
    devices : tuple of str
    """

    vertebrae: tuple[str, ...]
    files: tuple[str, ...]
    mode: str
    devices: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"vertebrae": list(self.vertebrae), "files": list(self.files), "mode": self.mode,
                "devices": list(self.devices)}


@dataclass(frozen=True)
class DeviceLoad:
    """What one device holds under a placement, bytes."""

    device: str
    usable: int
    weights: int
    transient: int
    members: int

    @property
    def need(self) -> int:
        return self.weights + self.transient

    @property
    def fits(self) -> bool:
        return self.need <= self.usable

    def to_dict(self) -> dict:
        return {"device": self.device, "usable_gib": _gib(self.usable), "weights_gib": _gib(self.weights),
                "transient_gib": _gib(self.transient), "need_gib": _gib(self.need), "members": self.members,
                "fits": self.fits}

    def line(self) -> str:
        return (f"{self.device}: {self.members} member(s), weights {_gib(self.weights)} GiB + calls "
                f"{_gib(self.transient)} GiB = {_gib(self.need)} GiB of {_gib(self.usable)} GiB usable")


def _gib(n: int) -> float:
    return round(n / GiB, 3)


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen placement and its numbers (:func:`plan_memory`). ``to_dict()`` goes in the run report."""

    placement: str
    batch_size: int
    requested_batch_size: int
    precision: str
    fits: bool
    groups: tuple[GroupPlacement, ...]
    loads: tuple[DeviceLoad, ...]
    network: NetworkBytes
    networks: int
    files: int
    host_weights: int = 0
    host_usable: int | None = None
    tried: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()
    head: str = ""
    input_shape: tuple[int, ...] = ()
    device_sources: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "placement": self.placement, "fits": self.fits, "batch_size": self.batch_size,
            "requested_batch_size": self.requested_batch_size, "precision": self.precision, "head": self.head,
            "input_shape": list(self.input_shape), "networks": self.networks, "files": self.files,
            "params_per_file": self.network.params, "weights_gib_per_file": _gib(self.network.weights),
            "total_weights_gib": _gib(self.files * self.network.weights),
            "call_gib_per_member": _gib(self.network.call(self.batch_size)),
            "per_device": [ld.to_dict() for ld in self.loads],
            "host_weights_gib": _gib(self.host_weights),
            "host_usable_gib": None if self.host_usable is None else _gib(self.host_usable),
            "groups": [g.to_dict() for g in self.groups], "tried": list(self.tried),
            "assumptions": list(self.assumptions), "device_memory": list(self.device_sources),
        }

    def work_per_device(self, crops_per_vertebra: int) -> dict[str, int]:
        """Image passes (crop x member) one study costs each device under this placement, with
        ``crops_per_vertebra`` crops for every vertebra (replicas share a pass evenly, the first take the rest)."""
        work = {ld.device: 0 for ld in self.loads}
        for g in self.groups:
            crops = crops_per_vertebra * len(g.vertebrae)
            if g.mode == "whole":
                work[g.devices[0]] += crops * len(g.files)
            elif g.mode == "replicas":
                share, rest = divmod(crops * len(g.files), len(g.devices))
                for i, d in enumerate(g.devices):
                    work[d] += share + (1 if i < rest else 0)
            else:
                for d in g.devices:
                    work[d] += crops
        return work

    def summary(self) -> str:
        """One line for the console."""
        state = "fits" if self.fits else "DOES NOT FIT"
        return (f"memory plan: {self.files} file(s) x {_gib(self.network.weights)} GiB ({self.head} "
                f"{'x'.join(map(str, self.input_shape))}, {self.precision}), {self.placement}, batch {self.batch_size}: "
                + "; ".join(ld.line() for ld in self.loads) + f" -> {state}")

    def refusal(self) -> str:
        """The message of :class:`MemoryPlanError`: the numbers, what was tried, the options."""
        total = self.files * self.network.weights
        return (
            f"the classifiers do not fit the devices' memory: {self.files} classifier file(s) of "
            f"{self.network.params:,} parameters ({self.head} at {'x'.join(map(str, self.input_shape))}) = "
            f"{_gib(total)} GiB of float32 weights, {_gib(self.network.call(1))} GiB more per member call at batch 1 "
            f"({self.precision}); devices: {', '.join(f'{ld.device} {_gib(ld.usable)} GiB' for ld in self.loads)}"
            + (f", host {_gib(self.host_usable)} GiB" if self.host_usable is not None else "")
            + f". Tried: {'; '.join(self.tried)}. Options: train with --final refit (one model per vertebra instead of "
            "one per fold), the gap head (about 23.6M parameters instead of 158M at 512 px), fewer folds, or a "
            "smaller input_size"
        )


def file_groups(config: ModelConfig, vertebrae: Sequence[str] = VERTEBRAE) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Vertebrae listing the same files (by name), in order: ``[(files, vertebrae)]``, as
    :func:`cspine_submit.score.loading.classifier_groups` forms them from resolved paths."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for v in vertebrae:
        groups.setdefault(tuple(config.classifier_paths(v)), []).append(v)
    return [(files, tuple(vs)) for files, vs in groups.items()]


_LABELS = {
    "whole": "networks whole, round-robin over the devices",
    "replicas": "the shared network replicated on each device, each study's batches split between them",
    "members": "ensemble members spread over the devices, each scored in turn on its device",
    "in turn": "weights in host memory, each member copied to its device for its call",
}


def _strategies(groups, n_devices: int) -> list[str]:
    """Resident placements worth trying, best first (both devices busy before one busy)."""
    multi = any(len(files) > 1 for files, _vs in groups)
    if n_devices > 1 and multi:
        return ["members", "whole"]
    if n_devices > 1 and len(groups) < n_devices:
        return ["replicas", "whole"]
    return ["whole", "members"] if multi else ["whole"]


def _layout(groups, devices: Sequence[str], mode: str) -> list[GroupPlacement]:
    """Each group's :class:`GroupPlacement` under ``mode``.

    ``members``: every member is a unit of work worth the vertebrae it scores; the units go, largest first, to the
    device with the least work so far (ties: the first device), so the devices finish a study together (35
    per-vertebra fold members: 18 and 17; a 5-fold shared network: 3 and 2). A group whose members all land on one
    device stays one graph there (``whole``).
    """
    n = len(devices)
    if mode == "whole":
        return [GroupPlacement(vs, files, "whole", (devices[i % n],)) for i, (files, vs) in enumerate(groups)]
    if mode == "replicas":
        return [GroupPlacement(vs, files, "replicas", tuple(devices)) for files, vs in groups]
    units = sorted(((len(vs), gi, mi) for gi, (files, vs) in enumerate(groups) for mi in range(len(files))),
                   key=lambda u: (-u[0], u[1], u[2]))
    work = [0] * n
    chosen: dict[tuple[int, int], str] = {}
    for cost, gi, mi in units:
        d = min(range(n), key=lambda j: (work[j], j))
        work[d] += cost
        chosen[(gi, mi)] = devices[d]
    out = []
    for gi, (files, vs) in enumerate(groups):
        devs = tuple(chosen[(gi, mi)] for mi in range(len(files)))
        if mode == "members" and len(set(devs)) == 1:
            out.append(GroupPlacement(vs, files, "whole", devs[:1]))
        else:
            out.append(GroupPlacement(vs, files, mode, devs))
    return out


def _loads(placements: Sequence[GroupPlacement], devices: Sequence[DeviceMemory], net: NetworkBytes,
           batch: int) -> tuple[DeviceLoad, ...]:
    """Bytes each device holds: its distinct resident files, plus its largest call (one call at a time per device:
    a device's work runs in one thread). A whole ensemble is one graph whose members may run concurrently, so its
    call counts every member's transient."""
    files: dict[str, set] = {d.name: set() for d in devices}
    calls: dict[str, int] = {d.name: 0 for d in devices}
    for g in placements:
        if g.mode in ("whole", "replicas"):
            for d in g.devices:
                files[d] |= set(g.files)
                calls[d] = max(calls[d], len(g.files) * net.call(batch))
        else:
            for f, d in zip(g.files, g.devices):
                if g.mode == "members":
                    files[d].add(f)
                calls[d] = max(calls[d], net.call(batch) + (net.weights if g.mode == "in turn" else 0))
    return tuple(DeviceLoad(d.name, d.usable, len(files[d.name]) * net.weights,
                            calls[d.name] + (GPU_WORKSPACE_BYTES if d.kind == "GPU" else 0), len(files[d.name]))
                 for d in devices)


def _halvings(batch: int) -> list[int]:
    out = [max(int(batch), 1)]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def plan_memory(config: ModelConfig, devices: Sequence[DeviceMemory], *, precision: str = "float32",
                groups=None, host_usable: int | None = None, batch_size: int | None = None,
                in_turn: bool = True) -> MemoryPlan:
    """Choose where ``config``'s classifiers go on ``devices``: the first placement that fits, in the order of the
    module's description (resident at the asked batch, resident at a smaller batch, in turn, nothing).

    Parameters
    ----------
    config : ModelConfig
        Its head, input shape, batch size and files (``classifier_files``).
    devices : sequence of DeviceMemory
        From :func:`device_memory`, or made up (the tests, :func:`kaggle_plans`).
    precision : "float32" or "mixed_float16"
        The Keras dtype policy the classifiers run under (``DevicePlan.precision``).
    groups : list of (files, vertebrae), optional
        Default :func:`file_groups` of ``config``.
    host_usable : int, optional
        Host bytes available for the weights of an in-turn placement; None: not limited.
    batch_size : int, optional
        Default ``config.batch_size``.
    in_turn : bool
        Whether the in-turn placement may be tried: TensorFlow's only (it copies a variable held in host memory to
        the device of the op reading it; Keras's torch and jax backends compute where the weights are).

    Returns
    -------
    MemoryPlan
        ``fits`` False when nothing fits (the last placement tried, at batch 1); :func:`require_fit` raises then.
    """
    if not devices:
        raise ValueError("plan_memory: no devices")
    groups = file_groups(config) if groups is None else [(tuple(map(str, f)), tuple(v)) for f, v in groups]
    net = network_bytes(config, precision)
    requested = int(batch_size or config.batch_size)
    names = [d.name for d in devices]
    n_files = len({f for files, _vs in groups for f in files})
    common = dict(requested_batch_size=requested, precision=precision, network=net, networks=len(groups),
                  files=n_files, head=config.head, input_shape=tuple(config.input_shape),
                  device_sources=tuple(f"{d.name}: {d.source}" for d in devices),
                  assumptions=_assumptions(precision))
    tried: list[str] = []
    candidates = [(mode, b) for mode in _strategies(groups, len(devices)) for b in _halvings(requested)]
    host_weights = n_files * net.weights
    if all(d.kind == "GPU" for d in devices) and not in_turn:
        tried.append("in turn: TensorFlow only (this backend computes where the weights are)")
    elif all(d.kind == "GPU" for d in devices) and (host_usable is None or host_weights <= host_usable):
        candidates += [("in turn", b) for b in _halvings(requested)]
    elif all(d.kind == "GPU" for d in devices):
        tried.append(f"in turn: the host holds {_gib(host_usable)} GiB, the weights need {_gib(host_weights)} GiB")
    last = None
    for mode, b in candidates:
        placements = _layout(groups, names, mode)
        loads = _loads(placements, devices, net, b)
        label = _LABELS[mode]
        last = (label, b, placements, loads)
        if all(ld.fits for ld in loads):
            return MemoryPlan(placement=label, batch_size=b, fits=True, groups=tuple(placements), loads=loads,
                              host_weights=host_weights if mode == "in turn" else 0, host_usable=host_usable,
                              tried=tuple(tried), **common)
        if b in (requested, 1):
            worst = max(loads, key=lambda ld: ld.need - ld.usable)
            tried.append(f"{mode} at batch {b}: {worst.line()}")
    label, b, placements, loads = last
    return MemoryPlan(placement=label, batch_size=b, fits=False, groups=tuple(placements), loads=loads,
                      host_weights=host_weights, host_usable=host_usable, tried=tuple(tried), **common)


def _assumptions(precision: str) -> tuple[str, ...]:
    return (
        "weights: float32 variables (Keras keeps them float32 under mixed_float16), each distinct file once",
        "mixed_float16: a float16 copy of a member's weights during its call" if precision == "mixed_float16"
        else "float32: no cast copies",
        "activations: the graph's peak of live maps per image times the batch; a whole ensemble graph counts every "
        "member's at once (its branches may run concurrently)",
        f"GPU: {GPU_WORKSPACE_BYTES // MiB} MiB per device for cuDNN scratch and fragmentation",
    )


def require_fit(plan: MemoryPlan) -> MemoryPlan:
    """``plan`` when it fits, else :class:`MemoryPlanError` with its numbers and the options."""
    if not plan.fits:
        raise MemoryPlanError(plan)
    return plan


KAGGLE_MACHINES: dict[str, tuple[tuple[str, ...], int, bool]] = {
    "P100": (("Tesla P100-PCIE-16GB",), 13 * GiB, False),
    "2xT4": (("Tesla T4", "Tesla T4"), 13 * GiB, True),
}
"""Kaggle's two GPU notebooks: ``{name: (GPU names, host memory planned for the weights, fast float16)}``. Kaggle
notebooks have had 13-31 GB of RAM over the years; 13 GiB is planned for the process (the P100 has no fast float16)."""


def kaggle_plans(config: ModelConfig, *, batch_size: int | None = None) -> dict[str, MemoryPlan]:
    """The memory plan of ``config`` on each Kaggle GPU machine (:data:`KAGGLE_MACHINES`), with the documented GPU
    memory; what ``train --plan`` checks before training classifiers meant for Kaggle."""
    out = {}
    for machine, (gpus, host, fast16) in KAGGLE_MACHINES.items():
        devices = [DeviceMemory(f"/device:GPU:{i}", known_gpu_memory(n)[0], "GPU", known_gpu_memory(n)[1])
                   for i, n in enumerate(gpus)]
        precision = "mixed_float16" if config.mixed_precision and fast16 else "float32"
        out[machine] = plan_memory(config, devices, precision=precision, host_usable=host, batch_size=batch_size)
    return out


def plan_for_devices(config: ModelConfig, device_plan, *, groups=None, batch_size: int | None = None) -> MemoryPlan:
    """The memory plan of ``config`` on the devices of ``device_plan`` (a ``DevicePlan``), their memory asked of
    TensorFlow (:func:`device_memory`) or of the torch or jax backend, the host's available memory for an in-turn
    placement (TensorFlow only)."""
    backend = getattr(device_plan, "backend", None)
    other = backend is not None and backend.name != "tensorflow"
    if other:
        devices = _other_backend_memory(device_plan, backend.name)
    else:
        devices = device_memory(device_plan.devices, device_plan.names if device_plan.kind == "GPU" else ())
    return plan_memory(config, devices, precision=device_plan.precision, groups=groups,
                       host_usable=host_available_bytes(), batch_size=batch_size, in_turn=not other)


def _other_backend_memory(device_plan, backend: str) -> list[DeviceMemory]:
    """The devices of a torch or jax backend: what the backend reports for each GPU, else the documented default of
    the GPU's name; the host's available memory shared by its CPU device(s)."""
    from cspine_submit.score.backends import other_backend_gpu_memory

    if device_plan.kind != "GPU":
        host = host_available_bytes()
        n = len(device_plan.devices)
        return [DeviceMemory(d, host // n, "CPU", f"host memory available ({host / GiB:.1f} GiB)"
                             + (f" shared by {n} CPU devices" if n > 1 else "")) for d in device_plan.devices]
    out = []
    for i, d in enumerate(device_plan.devices):
        usable, why = other_backend_gpu_memory(backend, i)
        if usable is None:
            usable, why = known_gpu_memory(device_plan.names[i])
        out.append(DeviceMemory(d, usable, "GPU", why))
    return out
