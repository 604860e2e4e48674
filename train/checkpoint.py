"""Sharded checkpoints on torch.distributed.checkpoint (DCP), saved in the background.

Layout: `<run>/checkpoints/step_<n>/` holds every rank's shard plus DCP's `.metadata`, which DCP
writes (tmp file + rename) only after *all* ranks reported their writes: a directory without it is
an interrupted save and is never resumed from. `latest` names the newest complete one and
`best.json` the best by val top-1; the last `keep` (and the best) survive purging.

What is saved is a dict of named states, as in torchtitan: any object with `state_dict()` and
`load_state_dict()` (scheduler, GradScaler, TrainState, EMA weights, ...) is one entry, and
`ModelState` and `OptimizerState` put model and optimizer through DCP's state-dict functions,
so W ranks' checkpoint loads on W'. Adding a state is one line where the dict is built.

Loading runs no pickled code: DCP stores non-tensor values (a learning rate, a step count) as
small pickles and its default planner reads them with `torch.load(weights_only=False)`;
`SafeLoadPlanner` reads them with `weights_only=True`, which refuses anything but plain data.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = logging.getLogger("resnet")
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
METADATA = ".metadata"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class UnsafeCheckpoint(ValueError):
    """A checkpoint value that is not plain data (a pickled object that would run code)."""


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner with its non-tensor values read by the weights-only unpickler."""

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError and friends
            raise UnsafeCheckpoint(f"checkpoint value '{read_item.dest_index.fqn}' is not plain data; "
                                   f"refusing to unpickle it ({str(e).splitlines()[0]})") from None
        buf = io.BytesIO()  # the vetted plain value, re-serialised: DCP's own code places it
        torch.save(obj, buf)
        buf.seek(0)
        super().load_bytes(read_item, buf)


class ModelState:
    """A model as DCP's resharding-aware state dict (FQN keys, no DDP or compile prefix)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState:
    """An optimizer's state keyed by parameter FQN, so it reshards like the model."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class Value:
    """A plain value saved as a state (the resolved config, say): lists, dicts, numbers, strings."""

    def __init__(self, value: Any = None):
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.value)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = json.loads(state["json"])


class RNGState:
    """This rank's Python, NumPy and torch generators, as tensors and numbers (no pickled tuples).
    Restored only on the same world size: on another one the ranks no longer map one to one."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def state_dict(self) -> dict[str, Any]:
        version, mt, gauss = random.getstate()
        _, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"world_size": self.world_size, "python_version": version,
                 "python_mt": torch.tensor(mt, dtype=torch.int64), "python_gauss": gauss,
                 "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
                 "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            return
        random.setstate((state["python_version"], tuple(state["python_mt"].tolist()), state["python_gauss"]))
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                             state["numpy_has_gauss"], state["numpy_cached"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def complete(path: Path) -> bool:
    return (path / METADATA).is_file()


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in ckpt_dir.glob("step_*") if p.is_dir() and complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest(ckpt_dir: Path) -> Path | None:
    found = checkpoints(ckpt_dir)
    return found[-1] if found else None


def saved_keys(path: Path) -> set[str]:
    """Flattened keys held by a checkpoint (`model.conv1.weight`, `scheduler.json`, ...)."""
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


class Checkpointer:
    def __init__(self, cfg, run_dir: Path, info):
        """`cfg`: the `checkpoint` config section; `info`: this rank's DistInfo."""
        self.cfg, self.dir, self.rank = cfg, Path(run_dir) / "checkpoints", info.rank
        self.pending = None  # (AsyncSaveResponse, path, top1) of the save in flight
        self.stager = None
        if cfg.async_save:  # one stager for the run: it keeps its (pinned, on CUDA) host buffers
            cuda = torch.cuda.is_available()
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                       use_async_staging=True, use_non_blocking_copy=cuda))
        # Background saves run their collectives on a group of their own, so they never
        # interleave with DDP's all-reduces on the default group (as torchtitan does).
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, states: dict[str, Stateful], *, step: int, top1: float | None = None) -> Path:
        """Start writing step_<step>; returns as soon as the state is copied (async) or written."""
        self.wait()
        path = self.dir / f"step_{step}"
        if complete(path):
            return path  # already saved at this step (e.g. end of epoch and end of run)
        sd = {name: obj.state_dict() for name, obj in states.items()}
        if self.cfg.async_save:
            response = dcp.async_save(sd, checkpoint_id=str(path), process_group=self.group,
                                      async_stager=self.stager)
            self.pending = (response, path, top1)
        else:
            dcp.save(sd, checkpoint_id=str(path), process_group=self.group)
            self._commit(path, top1)
        return path

    def wait_staged(self) -> None:
        """Block until the state being saved has been copied off the live tensors.

        Called before the next forward pass: BN buffers change in forward and weights in the
        optimizer step, so the copy must be finished by then. This is all the loop waits for.
        """
        if self.pending is not None:
            self.pending[0].staging_completion.result()

    def wait(self) -> None:
        """Block until the background save (if any) is on disk everywhere, then commit it."""
        if self.pending is None:
            return
        response, path, top1 = self.pending
        self.pending = None
        response.upload_completion.result()
        self._commit(path, top1)

    def close(self) -> None:
        self.wait()
        if self.stager is not None:
            self.stager.close()

    def _commit(self, path: Path, top1: float | None) -> None:
        if self.rank != 0:
            return
        tmp = self.dir / "latest.tmp"
        tmp.write_text(path.name + "\n")
        tmp.replace(self.dir / "latest")
        best = self.dir / "best.json"
        if top1 is not None and self.cfg.keep_best:
            prev = json.loads(best.read_text())["top1"] if best.exists() else -1.0
            if top1 > prev:
                best.write_text(json.dumps({"checkpoint": path.name, "top1": top1}))
        self.purge()

    def purge(self) -> None:
        keepers = set(p.name for p in checkpoints(self.dir)[-self.cfg.keep:])
        best = self.dir / "best.json"
        if self.cfg.keep_best and best.exists():
            keepers.add(json.loads(best.read_text())["checkpoint"])
        newest = max((int(n.split("_")[1]) for n in keepers), default=-1)
        for p in self.dir.glob("step_*"):
            step = int(p.name.split("_")[1])
            if p.name not in keepers and (complete(p) or step < newest):
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, states: dict[str, Stateful]) -> list[str]:
        """Restore every named state that `path` holds into the live objects; returns the names
        it did not hold (a state added since, or another rank's RNG), which keep their values."""
        if not complete(path):
            raise FileNotFoundError(f"train.resume: '{path}' is not a complete checkpoint (no {METADATA})")
        keys = saved_keys(path)
        held = {n: s for n, s in states.items() if any(k.startswith(f"{n}.") for k in keys)}
        sd = {name: obj.state_dict() for name, obj in held.items()}
        _load(sd, path, process_group=self.group)
        for name, obj in held.items():
            obj.load_state_dict(sd[name])
        return sorted(set(states) - set(held))


def _load(sd: dict, path: Path, **kw) -> None:
    """dcp.load with the safe planner; an unsafe value is reported as itself, not wrapped in DCP's
    CheckpointException with every rank's traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(sd, checkpoint_id=str(path), planner=SafeLoadPlanner(), **kw)
    except CheckpointException as e:
        for failure in e.failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, UnsafeCheckpoint):
                raise exc from None
        raise


def load_value(path: Path, name: str) -> Any:
    """The plain value saved as the named `Value` state `name` (e.g. "config"), read on this rank
    alone before anything is built; None if the checkpoint holds no such state."""
    if not any(k.startswith(f"{name}.") for k in saved_keys(path)):
        return None
    value = Value()
    sd = {name: value.state_dict()}
    _load(sd, path, no_dist=True)
    value.load_state_dict(sd[name])
    return value.value


def find_resume(resume: str, run_dir: Path) -> Path | None:
    """`auto`: newest complete checkpoint in the run dir (None for a fresh run); `off`; or a path."""
    if resume == "off":
        return None
    if resume == "auto":
        return latest(run_dir / "checkpoints")
    path = Path(resume)
    if not complete(path):
        raise FileNotFoundError(f"train.resume: '{path}' is not a complete checkpoint directory")
    return path


def load_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under `prefix` (e.g. "model.") from all shards, on the CPU,
    without a live model and without reading any non-tensor value (export, evaluation)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not sd:
        raise FileNotFoundError(f"no tensors under '{prefix.rstrip('.')}' in checkpoint '{path}'")
    _load(sd, path, no_dist=True)
    return {k[len(prefix):]: v for k, v in sd.items()}
