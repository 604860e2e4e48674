"""The fast path for the machine a rank runs on: autocast dtype, CPU threads per rank, TF32,
torch.compile; all decided in `choose` and `maybe_compile`, each logged in one line.

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
Threads: `cpu_threads` (why this rule: docs/cpu.md). Compile: `compile_choice`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import socket
import statistics
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
    timings, measured = _cached("amp", cpu, key, measure, write_cache)
    t32, t16 = reduce([timings["off"], timings["bf16"]])
    amp, why = cpu_amp(cpu, {"off": t32, "bf16": t16})
    return amp, why + ("" if measured else f" [cached in {cache_path()}]")


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

THREADS_MARGIN = 0.8  # all threads must take < 80 % of one thread's step: other jobs may hold cores
DECODE_NICE = 10  # decode workers that share the compute cores run this much nicer


def cpu_share(cpus: int, sharing: int) -> int:
    """This rank's CPUs: its affinity mask (`cpus` CPUs) split between the `sharing` ranks of the
    node whose masks overlap it (1 once torchrun --numa-binding or slurm/binding.py gave each rank
    its own CPUs). torchrun's OMP_NUM_THREADS=1 for several processes per node would leave the
    rest of the share idle."""
    return max(1, cpus // max(1, sharing))


def accelerator_threads(share: int, loader_workers: int) -> int:
    """On a GPU, the share less the decode workers beside the rank (the torch loader's processes),
    so that they do not fight over cores. Intra-op threads matter little there: the GPU computes,
    and the CPU only launches kernels and decodes (DALI decodes on the GPU)."""
    return max(1, share - loader_workers)


def cpu_threads(share: int, workers: int, step: dict[int, float]) -> tuple[int, int, str]:
    """(intra-op threads, nice of the decode workers, why) for a CPU rank with `share` CPUs and
    `workers` torch decode workers on them; `step[1]`, `step[share]`: the probe's seconds of one
    forward/backward at 1 and at `share` threads.

    All of the share computes, beside decode workers at a lower priority (DECODE_NICE): they decode
    in the gaps and yield when the intra-op threads want their cores. Quiet, on 2 cores with 2
    workers (benchmarks/cpu_split.py; docs/cpu.md): resnet18 at 224 px in fp32, compute-bound,
    trained 1.87x faster on 2 threads than on 1 (1.85x with the workers niced); resnet20 at 32 px
    from 500x375 JPEGs, where decoding takes half as long as the step, 1.04x on 2 threads but
    1.21x with the workers at nice 10 (fp32: 1.32x, 1.43x). The rule before, the share less the
    workers, left 1 thread: 0.57x a plain peer script (issue 23). Where other jobs hold the cores,
    more threads lose (resnet18 fp32 0.77x on 2 threads, bf16 0.29x) and niced workers starve, so
    the share computes only if the probe finds all threads clearly faster (THREADS_MARGIN); else
    one thread, the workers at their normal priority.
    """
    if share == 1:
        return 1, 0, "the rank's share is one CPU"
    c1, cn = step[1], step[share]
    numbers = f"probe: 1 thread {1e3 * c1:.0f} ms, {share} threads {1e3 * cn:.0f} ms per forward/backward"
    if cn < THREADS_MARGIN * c1:
        beside = f"; {workers} decode workers beside them at nice +{DECODE_NICE}" if workers else ""
        return share, DECODE_NICE if workers else 0, f"all {share} CPUs of the rank's share compute{beside} ({numbers})"
    return 1, 0, (f"{share} threads were not {1 / THREADS_MARGIN:.2f}x faster than 1 (other jobs holding cores?); "
                  f"1 thread ({numbers})")


def probe_threads(model: nn.Module, batch: int, crop: int, channels_last: bool, amp: str,
                  counts: tuple[int, ...], budget_s: float = 2.0) -> dict[int, float]:
    """Seconds of one forward/backward of a copy of `model` at each thread count in `counts`: the
    mean of at least 2 rounds (more while they fit in `budget_s` per count) after a warm-up,
    interleaved. The mean, not the best: where other jobs hold cores, a lucky 2-thread round says
    little about the sustained rate (on the loaded Xeon one probe round found 2 threads 1.2x faster
    than 1 in bf16, and training then ran 3.5x slower on 2 than on 1)."""
    model = copy.deepcopy(model).train()
    x = torch.randn(batch, 3, crop, crop)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    times: dict[int, list[float]] = {t: [] for t in counts}
    try:
        for i in range(8):
            for t in counts:
                torch.set_num_threads(t)
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                    out = model(x)
                out.float().sum().backward()
                if i:  # the first round is the warm-up (oneDNN builds its kernels)
                    times[t].append(time.perf_counter() - t0)
            if i >= 2 and sum(statistics.mean(v) for v in times.values()) * (i + 1) > budget_s * len(counts):
                break
    finally:
        torch.set_num_threads(before)
    return {t: statistics.mean(v) for t, v in times.items()}


def _cached(name: str, cpu: CpuInfo, key: str, measure: Callable[[], dict], write: bool) -> tuple[dict, bool]:
    """(the measurement of `key` on this CPU and torch, whether it was measured now) from
    ~/.cache/resnet-train/<name>.json; `write`: keep a new measurement there."""
    key = f"{cpu.model}|{cpu.capability}|torch {torch.__version__}|{key}"
    path = cache_path().with_name(f"{name}.json")
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key], False
    value = measure()
    if write:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            known[key] = value
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(path)
        except OSError as e:  # a read-only home is no reason to stop
            log.warning("could not cache the %s probe in %s: %s", name, path, e)
    return value, True


# -- torch.compile --------------------------------------------------------------------------------

# What compiling costs and gives on the CPU in fp32 (benchmarks/compile_cpu.py, Xeon, cold inductor
# cache, quiet, 2026-12-06; docs/cpu.md): resnet20 at 28 px, batch 128: 1.17x on 1 thread, 1.15x on 2
# (31-32 s of compiling, repaid after 667 and 1331 steps); resnet18 at 224 px, batch 64: 0.99x on 1
# thread, 1.02x on 2, 0.97x on 2 with AVX2 kernels (32-38 s). At a large input the step is oneDNN's
# convolutions either way; what inductor fuses, the elementwise rest, weighs only at small inputs.
# (Earlier runs under load had shown 1.22-1.30x at 224 px; quiet, that did not hold.) bf16 gained
# 0.89-1.29x, under load: not reliably worth it.
SMALL_INPUT = 64  # training crops up to this size are where compiling gained
COMPILE_S = 40  # the slowest compile measured quiet (38 s)
FP32_SAVES = 1 - 1 / 1.15  # the least share of a small-input fp32 step that compiling saved
COMPILE_MIN_S = 2 * COMPILE_S / FP32_SAVES  # planned eager seconds from which compiling repays it twice: ~10 min


def c_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU (its CXX, else g++/clang++/c++ on PATH)."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")


def compile_choice(requested, device: torch.device, amp: str, planned_s: float = 0.0, *,
                   crop: int) -> tuple[bool, str]:
    """(compile, why) for `model.compile=requested` (auto | on | off; a bool from code is on/off);
    `planned_s`: the run's planned eager compute per rank in seconds (planned steps x a probed step);
    `crop`: the training crop.

    `auto` compiles where the planned steps repay it twice over: on the CPU in fp32 at small inputs
    (crop <= SMALL_INPUT), from COMPILE_MIN_S of planned compute (the demo in fp32, ~5 min, stays
    eager; a 36-epoch fp32 run compiles). It leaves large inputs eager (resnet18 at 224 px gained
    0.97-1.02x), bf16 eager (see the gains above), GPUs eager (not measured here: today's behaviour),
    and machines without a C++ compiler (inductor needs one on the CPU). `on` compiles anywhere.
    """
    requested = {True: "on", False: "off"}.get(requested, requested)
    if requested != "auto":
        return requested == "on", "set in the config"
    if device.type != "cpu":
        return False, "auto: not measured on GPUs here (model.compile=on compiles)"
    if amp != "off":
        return False, f"auto: {amp} gained 0.89-1.29x from compiling, not reliably worth its compile time"
    if crop > SMALL_INPUT:
        return False, f"auto: at {crop} px compiling gained 0.97-1.02x in fp32 (resnet18 at 224 px), eager"
    if c_compiler() is None:
        return False, "auto: no C++ compiler for inductor (install g++ or set CXX)"
    line = (f"~{planned_s / 60:.0f} min of fp32 compute planned per rank; compiling repays itself from "
            f"~{COMPILE_MIN_S / 60:.0f} min (saves >= {FP32_SAVES:.0%} of a step at <= {SMALL_INPUT} px, "
            f"~{COMPILE_S} s to compile, 2x margin)")
    return planned_s >= COMPILE_MIN_S, f"auto: {line}"


def _workload(cfg, batch: int) -> str:
    """What a probe's timing depends on besides the machine, for the cache keys."""
    return (f"{cfg.model.name}|batch {batch}|crop {cfg.data.train_crop}|channels_last "
            f"{cfg.model.channels_last}")


def maybe_compile(cfg, info, model: nn.Module, bare: nn.Module, amp: str, steps: float, batch: int,
                  step_s: float | None = None) -> nn.Module:
    """`model` compiled (torch.compile) if `compile_choice` says so for `steps` planned optimizer steps
    of `batch` samples per rank; logged in one line. `step_s`: the seconds of one forward/backward
    at the rank's threads where `choose` timed it (the mean over ranks); else, where `auto` needs it,
    one of `bare` is timed here (cached like the other probes)."""
    planned_s = None
    crop = cfg.data.train_crop
    if (cfg.model.compile == "auto" and info.device.type == "cpu" and amp == "off" and crop <= SMALL_INPUT
            and c_compiler()):
        if step_s is None:  # `choose` did not time a step at these threads
            threads = torch.get_num_threads()
            step, _ = _cached("step", cpu_info(), f"{_workload(cfg, batch)}|amp {amp}|threads {threads}",
                              lambda: {"s": probe_threads(bare, batch, crop, cfg.model.channels_last, amp,
                                                          (threads,))[threads]}, info.local_rank == 0)
            (step_s,) = _mean_over_ranks(info)([step["s"]])
        planned_s = steps * step_s
    on, why = compile_choice(cfg.model.compile, info.device, amp, planned_s or 0.0, crop=crop)
    if planned_s is not None:
        why += f" ({steps:.0f} steps x {step_s:.2f} s)"
    log.info("compile %s: %s", "on" if on else "off", why)
    return torch.compile(model) if on else model


# -- the run's choice: threads and amp, once -------------------------------------------------------


def _share(info) -> int:
    """This rank's share of its affinity mask among the ranks of its node whose masks overlap it."""
    mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    masks = [(socket.gethostname(), mask)]
    if torch.distributed.is_initialized() and info.world_size > 1:
        masks = [None] * info.world_size
        torch.distributed.all_gather_object(masks, (socket.gethostname(), mask))
    sharing = sum(host == socket.gethostname() and bool(m & mask) for host, m in masks)
    return cpu_share(len(mask), sharing)


def _decode_workers(cfg, device: torch.device) -> int:
    """Decode workers on the rank's CPUs: the torch loader's processes, DALI's threads where DALI
    decodes on the CPU (on the GPU they mostly wait for it); none for synthetic data."""
    dali_cpu = cfg.data.loader == "dali" and (device.type == "cpu" or cfg.data.dali_device == "cpu")
    return cfg.data.workers if cfg.data.loader == "torch" or dali_cpu else 0


def _mean_over_ranks(info) -> Callable[[list[float]], list[float]]:
    from train.distributed import all_reduce_sum

    def mean(values: list[float]) -> list[float]:
        t = all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=info.device))
        return (t / info.world_size).tolist()
    return mean


def choose(cfg, info, model: nn.Module, batch: int, train_loader) -> tuple[str, int, float | None]:
    """(amp, intra-op threads, seconds of a forward/backward at those threads if the thread probe
    timed it) of this rank, amp and threads each logged in one line; `model` is the bare module,
    `batch` the micro-batch; `train_loader`'s decode workers are told their priority.

    Threads are decided here only: `dist.cpu_threads`, then an exported OMP_NUM_THREADS other than
    torchrun's 1, win; else the rank's share (`cpu_share`), on a GPU less its torch decode workers
    (`accelerator_threads`), on the CPU by `cpu_threads` from a probe cached like the amp one
    (not when the load average exceeded the CPUs: a loaded probe decides that run only). Every
    rank averages the probes' timings with the others, so all ranks choose alike.
    """
    user = os.environ.get("OMP_NUM_THREADS", "1")
    workers = _decode_workers(cfg, info.device)
    reduce = _mean_over_ranks(info)
    share = _share(info)  # collective: every rank calls it
    fixed = cfg.dist.cpu_threads or (int(user) if user != "1" else 0)
    threads = fixed or (share if info.device.type == "cpu" else accelerator_threads(share, workers))
    torch.set_num_threads(threads)
    log.info("%s", machine_header(info.device))

    key = f"{_workload(cfg, batch)}|threads {threads}|ranks/node {info.local_world_size}"
    amp, why = choose_amp(cfg.train.amp, info.device, key=key, reduce=reduce, write_cache=info.local_rank == 0,
                          measure=lambda: probe(model, batch, cfg.data.train_crop, cfg.model.channels_last))
    if info.device.type == "cuda":
        allow_tf32()
    log.info("amp %s: %s", amp, why)

    if fixed:
        log.info("threads %d: set by %s", threads, "dist.cpu_threads" if cfg.dist.cpu_threads else "OMP_NUM_THREADS")
        return amp, threads, None
    if info.device.type != "cpu":
        log.info("threads %d: the rank's %d CPUs less %d decode workers (the GPU computes)", threads, share, workers)
        return amp, threads, None
    key = f"{_workload(cfg, batch)}|amp {amp}|share {share}|ranks/node {info.local_world_size}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = load > len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else False
    probed = share > 1
    measured, fresh = (_cached("threads", cpu_info(), key, lambda: {str(t): s for t, s in probe_threads(
        model, batch, cfg.data.train_crop, cfg.model.channels_last, amp, (1, share)).items()},
        info.local_rank == 0 and not busy) if probed else ({"1": 0.0}, False))
    # the mean over the ranks that probed (all call the collective)
    c1, cn, n = reduce([measured["1"], measured.get(str(share), 0.0), float(probed)])
    torch_workers = cfg.data.workers if cfg.data.loader == "torch" else 0  # DALI's threads keep their priority
    step = {1: c1 / max(n, 1e-9), share: cn / max(n, 1e-9)}
    threads, nice, why = cpu_threads(share, torch_workers, step)
    if probed and not fresh:
        why += f" [cached in {cache_path().with_name('threads.json')}]"
    elif probed and busy:
        why += f" [not cached: load average {load:.1f} on {len(os.sched_getaffinity(0))} CPUs]"
    torch.set_num_threads(threads)
    decode = _find(train_loader, "set_decode_nice")
    if decode is not None:
        decode.set_decode_nice(nice)
    log.info("threads %d: %s", threads, why)
    return amp, threads, step[threads] if probed else None


def _find(loader, attr: str):
    """The loader in a chain of wrappers (MixLoader's `.loader`) that has `attr`, or None."""
    while loader is not None and not hasattr(loader, attr):
        loader = getattr(loader, "loader", None)
    return loader
