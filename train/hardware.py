"""The fast path for the machine a rank runs on: autocast dtype, CPU threads per rank, TF32.

Why this is decided at run time and not in the recipe: bf16 autocast trains resnet20 1.7x
faster than fp32 on an AMX Xeon and 10x *slower* on an AVX2-only EPYC, where oneDNN emulates
bf16 (benchmarks/cpu_switches.py). So `train.amp=auto` picks:
  - CUDA: bf16 on compute capability >= 8.0 (Ampere and later), else fp16 with a GradScaler
    (V100, T4); TF32 is allowed for the fp32 matmuls and convolutions either way.
  - CPU: fp32 unless the CPU computes bf16 natively (AMX or AVX-512 BF16 in its flags, and
    neither torch's nor oneDNN's ISA capped below it); where it does, a probe times one
    forward/backward of the actual model at the actual batch in fp32 and in bf16 and keeps
    the faster, cached per CPU model in ~/.cache/resnet-train/amp.json.
Every rank sums the probe's timings with the others, so all ranks pick the same dtype.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("resnet")

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
MARGIN = 0.95  # bf16 must take < 95 % of fp32's time to be chosen (fp32 is the more exact one)


@dataclass(frozen=True)
class CpuInfo:
    model: str  # /proc/cpuinfo "model name"
    flags: frozenset[str]
    capability: str  # torch.backends.cpu.get_cpu_capability(): the ISA level torch dispatches to
    cpus: int  # CPUs this process may run on (its affinity mask, not the machine's count)

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls/convs run in hardware: the flags have them and no ISA cap hides them
        (ATEN_CPU_CAPABILITY=avx2 or ONEDNN_MAX_CPU_ISA=AVX2 make a Xeon behave like an EPYC)."""
        isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
        onednn_ok = isa_cap in ("ALL", "DEFAULT") or "BF16" in isa_cap or "AMX" in isa_cap
        return bool(self.flags & set(BF16_FLAGS)) and self.capability.startswith("AVX512") and onednn_ok

    def describe(self) -> str:
        native = "+".join(f for f in BF16_FLAGS if f in self.flags) or "no native bf16"
        if native != "no native bf16" and not self.native_bf16:
            native += f" capped by ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}"
        return f"{self.model} ({self.capability}, {native}, {self.cpus} CPUs)"


def cpu_info() -> CpuInfo:
    model, flags = "unknown CPU", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:  # not Linux: no flags, so no bf16 by flags
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuInfo(model, flags, torch.backends.cpu.get_cpu_capability(), cpus)


def machine_header(device: torch.device | None = None) -> str:
    """One line naming the machine, for benchmark headers and the run log."""
    cpu = cpu_info()
    line = f"CPU {cpu.describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device is not None and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        line += f"; GPU {torch.cuda.get_device_name(device)} (sm {major}.{minor})"
    return line


# -- autocast dtype -------------------------------------------------------------------------------


def cuda_amp(capability: tuple[int, int]) -> tuple[str, str]:
    """(amp, why) for a GPU of this compute capability."""
    if capability >= (8, 0):
        return "bf16", f"compute capability {capability[0]}.{capability[1]} >= 8.0 has bf16 tensor cores"
    return "fp16", f"compute capability {capability[0]}.{capability[1]} < 8.0: fp16 with loss scaling"


def cpu_amp(cpu: CpuInfo, timings: dict[str, float] | None) -> tuple[str, str]:
    """(amp, why) on the CPU; `timings` are the probe's seconds per step for "off" and "bf16"."""
    if not cpu.native_bf16:
        return "off", f"{cpu.describe()}: bf16 would be emulated, fp32"
    t32, t16 = timings["off"], timings["bf16"]
    speed = f"probe fp32 {1e3 * t32:.0f} ms, bf16 {1e3 * t16:.0f} ms per step"
    if t16 < MARGIN * t32:
        return "bf16", f"{cpu.describe()}: bf16 {t32 / t16:.2f}x faster ({speed})"
    return "off", f"{cpu.describe()}: bf16 not faster ({speed}), fp32"


def probe(model: nn.Module, batch: int, crop: int, channels_last: bool, repeats: int = 2) -> dict[str, float]:
    """Seconds of one forward/backward of a copy of `model` in fp32 and in bf16 (best of
    `repeats`, after one warm-up each, interleaved so that drift hits both)."""
    model = copy.deepcopy(model).train()  # the live model's BN statistics stay untouched
    x = torch.randn(batch, 3, crop, crop)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"off": [], "bf16": []}
    for i in range(repeats + 1):
        for amp in times:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                out = model(x)
            out.float().sum().backward()
            if i:  # the first round is the warm-up (oneDNN builds its kernels)
                times[amp].append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return {amp: min(t) for amp, t in times.items()}


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "resnet-train" / "amp.json"


def choose_amp(requested: str, device: torch.device, *, measure: Callable[[], dict[str, float]],
               key: str, reduce: Callable[[list[float]], list[float]] = lambda v: v,
               write_cache: bool = True, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """(amp, why) for `train.amp=requested` on `device`.

    `measure` runs the probe (only on a CPU with native bf16, and only on a cache miss); `key`
    names what the timing depends on; `reduce` averages a list over ranks so all ranks agree.
    """
    from train.config import ConfigError

    if device.type == "cuda":
        if requested != "auto":
            return requested, "set in the config"
        return cuda_amp(torch.cuda.get_device_capability(device))
    cpu = cpu or cpu_info()
    if requested == "fp16":
        raise ConfigError("train.amp: fp16 needs a CUDA GPU; use auto, bf16 or off on the CPU")
    if requested == "bf16" and not cpu.native_bf16:
        log.warning("train.amp=bf16 on %s: bf16 is emulated there and ~10x slower than fp32; "
                    "train.amp=auto picks fp32", cpu.describe())
    if requested != "auto":
        return requested, "set in the config"
    if not cpu.native_bf16:
        return cpu_amp(cpu, None)
    cache = cache_path()
    full_key = f"{cpu.model}|{cpu.capability}|torch {torch.__version__}|{key}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    timings = known.get(full_key)
    measured = timings is None
    if measured:
        timings = measure()
    t32, t16 = reduce([timings["off"], timings["bf16"]])
    amp, why = cpu_amp(cpu, {"off": t32, "bf16": t16})
    if measured and write_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            known[full_key] = timings
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(cache)
        except OSError as e:  # a read-only home is no reason to stop
            log.warning("could not cache the amp probe in %s: %s", cache, e)
    return amp, why + ("" if measured else f" [cached in {cache}]")


def allow_tf32() -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores (Ampere+): ~10 bits of mantissa,
    the precision DLE and torchvision's references train with. Set through the `fp32_precision`
    API that torch 2.9+ and inductor read: after it, reading the legacy `allow_tf32` raises
    ("mix of the legacy and new APIs"), and setting the legacy flags is deprecated."""
    if hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# -- threads --------------------------------------------------------------------------------------


def cpu_threads(requested: int, *, cpus: int, sharing: int, loader_workers: int) -> int:
    """Intra-op threads of one rank: `requested`, or its share of the CPUs it may run on.

    torchrun sets OMP_NUM_THREADS=1 whenever it starts several processes per node, which leaves
    all but one core per rank idle when ranks have more. The share is this rank's affinity mask
    (`cpus` CPUs) split between the `sharing` ranks of the node whose masks overlap it (1 once
    torchrun --numa-binding or slurm/binding.py gave each rank its own CPUs), less the decode
    worker processes (torch loader) that run beside each rank, so that the two do not fight
    over cores (OpenMP threads spin on a busy core).
    """
    if requested > 0:
        return requested
    return max(1, cpus // max(1, sharing) - loader_workers)
