"""Process-group setup from torchrun's (or SLURM's) environment, seeding, and cross-rank sums.

One device per local rank: CUDA when present (nccl), otherwise the CPU (gloo). A single process
with no launcher is a world of one and needs no process group at all.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from train.config import ConfigError, DistConfig

log = logging.getLogger("resnet")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # ranks on this node (they share its CPUs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_slurm() -> None:
    """Fill torchrun's variables from SLURM's when a task was started by srun, not torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1")
    os.environ.setdefault("LOCAL_WORLD_SIZE", per_node.split("(")[0].split(",")[0])  # "8(x2)" -> 8
    os.environ.setdefault("MASTER_PORT", "29500")
    if "MASTER_ADDR" not in os.environ:
        import subprocess

        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = slurm_node_address(nodes[0])


def slurm_node_address(node: str) -> str:
    """The address SLURM itself reaches `node` at (its NodeAddr), for MASTER_ADDR or a rendezvous
    endpoint: a node's name need not resolve (slurm/cluster.sh runs n1 and n2 on one host, both
    NodeAddr=127.0.0.1). The name when scontrol cannot tell."""
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    addr = next((f.split("=", 1)[1] for f in out.split() if f.startswith("NodeAddr=")), "")
    return addr if addr and addr != "(null)" else node


def restart_safe_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys private to this torchrun restart round.

    torchrun (--max-restarts) keeps one TCPStore across rounds, and the process-group keys
    ("rank 0's address") are the same in every round: a restarted rank could read the address of
    a peer killed in the previous round and fail in gloo's connectFullMesh ("Connection refused").
    Seen here about one restart in three; a per-round prefix removes the race.
    """
    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_serves, timeout=timeout)
    return dist.PrefixStore(f"resnet/round_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


# NCCL's flight recorder (the last collectives of each rank, with their state) and its dump when
# a collective times out, into <run>/hang/nccl_trace_rank_<rank>; names as read by torch 2.14
# (libtorch: TORCH_FR_* first, the TORCH_NCCL_* names they replace second). Asynchronous error
# handling 3 (tear down without ncclCommAbort) lets the dump finish: torchtitan sets it for the
# same reason; torchrun's default 1 aborts first.
NCCL_DEBUG_ALIASES = {"TORCH_FR_BUFFER_SIZE": "TORCH_NCCL_TRACE_BUFFER_SIZE",
                      "TORCH_FR_DUMP_TEMP_FILE": "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"}


def nccl_debug_env(backend: str, run_dir: Path | None, environ=None) -> dict[str, str]:
    """The variables to set before an NCCL process group starts; a value the user set (under
    either name) wins, except torchrun's own TORCH_NCCL_ASYNC_ERROR_HANDLING=1. Nothing for gloo."""
    if backend != "nccl" or run_dir is None:
        return {}
    environ = os.environ if environ is None else environ
    want = {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": str(Path(run_dir) / "hang" / "nccl_trace_rank_"),
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    user = {k for k in want if k in environ or NCCL_DEBUG_ALIASES.get(k, k) in environ}
    if environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "1" and "TORCHELASTIC_RUN_ID" in environ:
        user.discard("TORCH_NCCL_ASYNC_ERROR_HANDLING")  # torchrun's default, not the user's
    return {k: v for k, v in want.items() if k not in user}


def init(cfg: DistConfig, run_dir: Path | None = None) -> DistInfo:
    """Join the process group described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).

    Takes the `dist` section whole, so a new setting (a second backend, a mesh shape) reaches
    here without touching every caller. `run_dir`: where NCCL dumps its flight recorder.
    """
    env_from_slurm()
    device, backend = cfg.device, cfg.backend
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dist.device: 'cuda' was asked for but no CUDA GPU is visible")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if debug_env := nccl_debug_env(backend, run_dir):
        (Path(run_dir) / "hang").mkdir(parents=True, exist_ok=True)
        os.environ.update(debug_env)
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        dist.init_process_group(backend, timeout=timeout, device_id=dev if use_cuda else None,
                                store=restart_safe_store(rank, world, timeout), rank=rank, world_size=world)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return DistInfo(rank, world, local_rank, dev, local_world)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(cfg: DistConfig, run_dir: Path | None = None):
    """Init on entry; destroy on any exit, without a barrier.

    A failing rank exits at once with its traceback; torchrun (or srun's --kill-on-bad-exit)
    then stops its peers instead of leaving them blocked in a collective until the timeout.
    """
    info = init(cfg, run_dir)
    try:
        yield info
    finally:
        with contextlib.suppress(Exception):
            destroy()


def seed_everything(seed: int, rank: int, deterministic: bool = False) -> None:
    """Different, reproducible streams per rank (augmentation must differ across ranks)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op for a world of one); returns the same tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

