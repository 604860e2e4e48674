"""CPU binding per local rank: torch's NUMA binding next to a GPU, an exclusive CPU share without.

With GPUs, `torchrun --numa-binding=node` binds each worker to the CPUs of the NUMA node of the
GPU whose index is its local rank (torch.numa.binding; slurm/train.sbatch passes it). Submitit
tasks have no torchrun: `bind()` applies the same torch module to the running task.

torch's modes (node, socket, exclusive, core-complex) all start from "the NUMA node of GPU
LOCAL_RANK" and raise "No accelerator available" on a CPU-only node (torchrun then fails to
start). There, local rank r of n gets the r-th of n contiguous, disjoint runs of the physical
cores the task may use, which is what torch's `exclusive` does with the cores of one NUMA node:
two ranks on a 2-CPU node get {0} and {1}. Each rank's intra-op threads then come from its own
mask. Nothing is bound when srun already bound the task (SLURM_CPU_BIND_TYPE, e.g.
`srun --cpu-bind=cores`), or with mode `off`.

    python slurm/binding.py -- CMD ARGS...   # CPU share from LOCAL_RANK / LOCAL_WORLD_SIZE, then exec CMD

(the CPU-only path of slurm/train.sbatch: no torch import, CMD keeps this process's pid).
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

MODES = ("node", "socket", "exclusive", "core-complex", "off")  # torchrun --numa-binding's, and off
log = logging.getLogger("resnet")


def parse_cpu_list(text: str) -> set[int]:
    """'0-3,8,10-11' (sysfs, numactl) -> {0, 1, 2, 3, 8, 10, 11}."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def format_cpu_list(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5'."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def physical_cores(cpus: Iterable[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> list[list[int]]:
    """The logical CPUs of `cpus` grouped by physical core (hyperthreads together), cores in
    order of their first CPU; a CPU whose topology cannot be read is a core of its own."""
    allowed = set(cpus)
    cores: dict[int, list[int]] = {}
    for c in sorted(allowed):
        try:
            siblings = parse_cpu_list((sysfs / f"cpu{c}/topology/thread_siblings_list").read_text()) & allowed
        except (OSError, ValueError):
            siblings = {c}
        cores.setdefault(min(siblings | {c}), []).append(c)
    return [cores[k] for k in sorted(cores)]


def cpu_share(cores: list[list[int]], local_rank: int, local_world_size: int) -> set[int]:
    """Local rank r's exclusive share: the r-th of `local_world_size` contiguous runs of `cores`
    (the first `len(cores) % n` ranks get one core more). With fewer cores than ranks the split
    is over logical CPUs; with fewer CPUs than ranks, ranks share CPUs round robin."""
    n = max(1, local_world_size)
    if len(cores) < n:
        cores = [[c] for core in cores for c in core]
    if len(cores) < n:
        return set(cores[local_rank % len(cores)])
    per, extra = divmod(len(cores), n)
    start = local_rank * per + min(local_rank, extra)
    end = start + per + (1 if local_rank < extra else 0)
    return {c for core in cores[start:end] for c in core}


def bound_by_slurm() -> bool:
    """srun already bound this task to CPUs (task/affinity or task/cgroup with --cpu-bind)."""
    kind = os.environ.get("SLURM_CPU_BIND_TYPE", "").strip().rstrip(":").lower()
    return kind not in ("", "none")


def bind(mode: str, local_rank: int, local_world_size: int) -> set[int] | None:
    """Bind this process (all its threads) for `local_rank`; the CPUs it may use after, or None
    when nothing was bound (mode off, srun bound it already, a GPU node without numactl)."""
    if mode not in MODES:
        raise ValueError(f"CPU binding mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return None
    if bound_by_slurm():
        log.info("CPU binding: left to srun (SLURM_CPU_BIND_TYPE=%s)", os.environ["SLURM_CPU_BIND_TYPE"])
        return None
    import torch

    if torch.accelerator.is_available():
        if shutil.which("numactl") is None:  # torch.numa.binding checks for it on every path
            log.warning("CPU binding %s: torch.numa.binding needs the numactl command; not bound", mode)
            return None
        return bind_next_to_accelerator(mode, local_rank)
    cpus = cpu_share(physical_cores(os.sched_getaffinity(0)), local_rank, local_world_size)
    bind_threads(cpus)
    return os.sched_getaffinity(0)


INDEX_KEYWORDS = ("device_index", "gpu_index")  # torch 2.14's spelling; torch 2.8/2.9 said gpu_index


def index_keyword(fn) -> str | None:
    """The keyword `fn` takes the accelerator index by (torch renamed it), None if neither."""
    params = inspect.signature(fn).parameters
    return next((k for k in INDEX_KEYWORDS if k in params), None)


def bind_next_to_accelerator(mode: str, local_rank: int) -> set[int] | None:
    """torch.numa.binding's `mode` for the accelerator `local_rank`, applied to this process.

    torch exposes NumaOptions/AffinityMode but applies them only from torchrun's launcher, so this
    calls the private function torchrun uses. Its keyword for the index changed between releases
    (gpu_index in 2.8/2.9, device_index in 2.14): it is read from the signature, and a torch
    without the function or with neither keyword leaves the process unbound with one warning."""
    try:
        from torch.numa import binding
        apply = binding._maybe_apply_numa_binding_to_current_process
        options = binding.NumaOptions(binding.AffinityMode(mode))
    except (ImportError, AttributeError, ValueError) as e:
        log.warning("CPU binding %s: this torch has no usable torch.numa.binding (%s); not bound", mode, e)
        return None
    keyword = index_keyword(apply)
    if keyword is None:
        log.warning("CPU binding %s: torch.numa.binding._maybe_apply_numa_binding_to_current_process%s takes "
                    "neither of %s; not bound", mode, inspect.signature(apply), "/".join(INDEX_KEYWORDS))
        return None
    apply(**{keyword: local_rank}, numa_options=options)
    return os.sched_getaffinity(0)


def bind_threads(cpus: set[int]) -> None:
    """Every thread of this process to `cpus`: torch.numa.binding's own helper (private), or the
    same loop over /proc/self/task where a torch lacks it."""
    try:
        from torch.numa import binding
        binding._bind_all_threads_in_current_process_to_logical_cpus(logical_cpu_indices=cpus)
    except (ImportError, AttributeError, TypeError):  # TypeError: a renamed keyword
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cpus)


def main(argv: list[str]) -> None:
    """`binding.py [--mode M] -- CMD...`: the CPU share of LOCAL_RANK, then exec CMD (CPU nodes)."""
    mode = "exclusive"
    if argv[:1] == ["--mode"]:
        mode, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise SystemExit("usage: binding.py [--mode MODE] -- CMD [ARGS...]")
    rank, world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if mode != "off" and not bound_by_slurm():
        before = os.sched_getaffinity(0)
        cpus = cpu_share(physical_cores(before), rank, world)
        os.sched_setaffinity(0, cpus)  # single-threaded here: the exec'd command inherits it
        node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
        print(f"[binding] {node} local rank {rank}/{world}: CPUs {format_cpu_list(cpus)} "
              f"of {format_cpu_list(before)}", file=sys.stderr, flush=True)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
