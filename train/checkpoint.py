"""Sharded checkpoints on torch.distributed.checkpoint (DCP), saved in the background, checked on load.

Layout: `<run>/checkpoints/step_<n>/` holds every rank's shard (`__<rank>_0.distcp`), DCP's
`.metadata`, and our `manifest.json`: the size and CRC-32 of every file, written (tmp file + rename)
only after every rank has written and hashed its files. A checkpoint is *complete* when it has
both; only complete ones become `latest`, and a directory without them (an interrupted save, a
full disk) is never resumed from and is removed by the next save or purge. `best.json` names the
best by val top-1; the last `keep` (and the best) survive purging. docs/reliability.md has the
failure cases and exit codes.

What is saved is a dict of named states, as in torchtitan: any object with `state_dict()` and
`load_state_dict()` (scheduler, GradScaler, TrainState, EMA weights, ...) is one entry, and
`ModelState` and `OptimizerState` put model and optimizer through DCP's state-dict functions,
so W ranks' checkpoint loads on W'. Adding a state is one line where the dict is built.

A save that cannot be written (free space below the last checkpoint's size or the state's tensor
bytes, checked before writing; ENOSPC or any other write error) is one line naming the path, the bytes needed and free:
`checkpoint.on_error=stop` exits with code 4 (the previous checkpoint intact), `skip` warns and
trains on.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from train import integrity  # what makes a checkpoint safe to load (consult-only)

log = logging.getLogger("resnet")
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
DAMAGED = "damaged"  # checkpoints/damaged/: where resume=auto moves a damaged checkpoint


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---- states ----------------------------------------------------------------------------------------

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
    """This rank's Python, NumPy and torch generators, as tensors and numbers (no pickled tuples),
    plus the device's generator when the run is on CUDA (`device`: the run's, DistInfo.device; a
    run on the CPU never touches CUDA, even where a GPU is visible). Restored only on the same
    world size: on another one the ranks no longer map one to one. The device generator is an
    optional key: a CPU-written checkpoint resumes on a GPU (it keeps its seeded generator) and a
    GPU-written one on the CPU."""

    optional_keys = ("cuda",)  # Checkpointer.load leaves out of DCP's strict load what was not saved

    def __init__(self, world_size: int, device: torch.device | str | None = None):
        self.world_size = world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def state_dict(self) -> dict[str, Any]:
        version, mt, gauss = random.getstate()
        _, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"world_size": self.world_size, "python_version": version,
                 "python_mt": torch.tensor(mt, dtype=torch.int64), "python_gauss": gauss,
                 "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
                 "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            return
        random.setstate((state["python_version"], tuple(state["python_mt"].tolist()), state["python_gauss"]))
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                             state["numpy_has_gauss"], state["numpy_cached"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)


# ---- which checkpoints exist, and are they intact ---------------------------------------------------

def saved(path: Path) -> bool:
    """DCP finished writing it (`.metadata`): complete, or written before manifests existed."""
    return (Path(path) / integrity.METADATA).is_file()


def complete(path: Path) -> bool:
    """DCP finished writing it and every rank's files were hashed into its manifest."""
    return saved(path) and (Path(path) / integrity.MANIFEST).is_file()


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    found = [p for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=_step)


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in _step_dirs(ckpt_dir) if complete(p)]


def latest(ckpt_dir: Path) -> Path | None:
    found = checkpoints(ckpt_dir)
    return found[-1] if found else None


def newest_saved(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint, else the newest one without a manifest (read unverified)."""
    found = checkpoints(ckpt_dir) or [p for p in _step_dirs(ckpt_dir) if saved(p)]
    return found[-1] if found else None


def saved_keys(path: Path) -> set[str]:
    """Flattened keys held by a checkpoint (`model.conv1.weight`, `scheduler.json`, ...)."""
    return set(integrity.read_metadata(path).state_dict_metadata)


# ---- saving ----------------------------------------------------------------------------------------

class _HostStager(DefaultStager):
    """DefaultStager's copy (cached host buffers) in a thread, for a run on the CPU: DefaultStager's
    own thread mode makes an accelerator stream wherever one is visible (a CUDA context on GPU 0
    under dist.device=cpu). The thread matters: ResNet-50's 195 MiB copied on the main thread took
    0.76 s against 0.05 s in a thread here (2 intra-op threads, other processes on both cores)."""

    def __init__(self):
        super().__init__(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=False))
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-staging")

    def stage(self, state_dict, **kwargs) -> Future:
        return self._thread.submit(super().stage, state_dict, **kwargs)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        super().close()


@dataclass
class _Pending:
    staged: Future | None  # None: staged before async_save returned
    uploaded: Future
    writer: integrity.HashingWriter
    path: Path
    top1: float | None
    needed: int  # bytes the save was expected to take


class Checkpointer:
    def __init__(self, cfg, run_dir: Path, info):
        """`cfg`: the `checkpoint` config section; `info`: this rank's DistInfo (its device decides
        pinned memory and CUDA syncs: a run on the CPU touches no CUDA even where a GPU is visible)."""
        self.cfg, self.dir, self.rank, self.device = cfg, Path(run_dir) / "checkpoints", info.rank, info.device
        self.pending: _Pending | None = None
        self.stager = None
        if cfg.async_save:  # one stager for the run: it keeps its (pinned, on CUDA) host buffers
            cuda = self.device.type == "cuda"  # the copy to pinned memory runs on a side stream
            self.stager = (DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=True))
                           if cuda else _HostStager())
        # Background saves run their collectives on a group of their own, so they never
        # interleave with DDP's all-reduces on the default group (as torchtitan does).
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.last_size = 0  # bytes of the newest complete checkpoint (rank 0): the free space a save needs
        self.skipped_step = -1  # on_error=skip: a step whose save failed is not retried at that step
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if (newest := latest(self.dir)) is not None:
                self.last_size = self._manifest_bytes(newest)

    def save(self, states: dict[str, Stateful], *, step: int, top1: float | None = None) -> Path:
        """Start writing step_<step>; returns as soon as the state is copied (async) or written."""
        self.wait()
        path = self.dir / f"step_{step}"
        if complete(path) or step == self.skipped_step:
            return path  # already saved (or skipped) at this step (e.g. end of epoch and end of run)
        sd = {name: obj.state_dict() for name, obj in states.items()}
        needed = max(self.last_size, integrity.tensor_bytes(sd))  # the last checkpoint or this state; rank 0's counts
        short = False
        if self.rank == 0:
            if path.exists():  # an interrupted save at this step: its files are never reused
                shutil.rmtree(path, ignore_errors=True)
            short = shutil.disk_usage(self.dir).free < needed
        if self._from_rank0(short):  # every rank skips (or stops) together
            self._on_error(path, f"not enough space for {path.name} in '{self.dir}'", needed)
            return path
        writer = integrity.HashingWriter(path, self.device)
        try:
            if self.cfg.async_save:
                if self.device.type == "cuda":
                    # The stager copies on a side stream that does not wait for the compute stream:
                    # the last optimizer step's kernels must be done before it reads the weights.
                    torch.cuda.current_stream(self.device).synchronize()
                response = dcp.async_save(sd, storage_writer=writer, process_group=self.group,
                                          async_stager=self.stager)
                staged, uploaded = ((None, response) if isinstance(response, Future)
                                    else (response.staging_completion, response.upload_completion))
                self.pending = _Pending(staged, uploaded, writer, path, top1, needed)
                return path
            dcp.save(sd, storage_writer=writer, process_group=self.group)
        except (Exception, CheckpointException) as e:
            if (reason := integrity.write_failure(e)) is None:
                raise
            self._on_error(path, f"writing '{path}' failed ({reason})", needed)
            return path
        self._commit(path, writer, top1, needed)
        return path

    def wait_staged(self) -> None:
        """Block until the state being saved has been copied off the live tensors.

        Called before the next forward pass: BN buffers change in forward and weights in the
        optimizer step, so the copy must be finished by then. This is all the loop waits for.
        On CUDA the staging future completes after the staging stream has synchronized.
        """
        if self.pending is not None and self.pending.staged is not None:
            self.pending.staged.result()

    def wait(self) -> None:
        """Block until the background save (if any) is on disk everywhere, then commit it."""
        if self.pending is None:
            return
        p, self.pending = self.pending, None
        try:
            p.uploaded.result()
        except (Exception, CheckpointException) as e:
            if (reason := integrity.write_failure(e)) is None:
                raise
            self._on_error(p.path, f"writing '{p.path}' failed ({reason})", p.needed)
            return
        self._commit(p.path, p.writer, p.top1, p.needed)

    def close(self) -> None:
        self.wait()
        if self.stager is not None:
            self.stager.close()

    def _from_rank0(self, value: Any) -> Any:
        if self.group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    @staticmethod
    def _manifest_bytes(path: Path) -> int:
        try:
            return sum(f["bytes"] for f in integrity.read_manifest(path).values())
        except integrity.DamagedCheckpoint:
            return 0

    def _commit(self, path: Path, writer: integrity.HashingWriter, top1: float | None, needed: int) -> None:
        """Rank 0 writes the manifest (every rank's file hashes), then `latest`: from here on the
        checkpoint is complete. A failure (the disk filled up since) is handled as a failed save."""
        files = dict(writer.files)
        if self.group is not None:
            every = [None] * dist.get_world_size(self.group) if self.rank == 0 else None
            dist.gather_object(writer.files, every, dst=0, group=self.group)
            if self.rank == 0:
                files = {name: d for rank_files in every for name, d in rank_files.items()}
        reason = None
        if self.rank == 0:
            try:
                tmp = path / (integrity.MANIFEST + ".tmp")
                with open(tmp, "w") as f:
                    json.dump({"format": 1, "checksum": "crc32", "files": dict(sorted(files.items()))}, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                tmp.replace(path / integrity.MANIFEST)
                self.last_size = sum(d["bytes"] for d in files.values())
                tmp = self.dir / "latest.tmp"
                tmp.write_text(path.name + "\n")
                tmp.replace(self.dir / "latest")
                best = self.dir / "best.json"
                if top1 is not None and self.cfg.keep_best:
                    prev = json.loads(best.read_text())["top1"] if best.exists() else -1.0
                    if top1 > prev:
                        best.write_text(json.dumps({"checkpoint": path.name, "top1": top1}))
            except OSError as e:
                reason = f"writing '{path / integrity.MANIFEST}' failed ({integrity.short_reason(e)})"
        if (reason := self._from_rank0(reason)) is not None:
            self._on_error(path, reason, needed)
            return
        if self.rank == 0:
            self.purge()

    def _on_error(self, path: Path, what: str, needed: int) -> None:
        """A save that failed on every rank: rank 0 removes its directory and words one line (the
        bytes needed and free, the checkpoint that stays newest); then stop or skip."""
        message = None
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
            free = shutil.disk_usage(self.dir).free
            newest = latest(self.dir)
            kept = f"{newest.name} is the newest complete checkpoint" if newest else "no complete checkpoint yet"
            size = integrity.human_bytes
            message = f"checkpoint: {what}: needs {size(needed)}, {size(free)} free; {kept}"
        message = self._from_rank0(message)
        if self.cfg.on_error == "stop":
            raise integrity.CheckpointSaveError(message)
        self.skipped_step = _step(path)
        if self.rank == 0:
            log.warning("SKIPPED %s (checkpoint.on_error=skip), training goes on: %s", path.name, message)

    def purge(self) -> None:
        """Keep the newest `keep` saved checkpoints and the best; remove the rest, and any
        interrupted save older than the newest kept one."""
        keepers = set(p.name for p in [p for p in _step_dirs(self.dir) if saved(p)][-self.cfg.keep:])
        best = self.dir / "best.json"
        if self.cfg.keep_best and best.exists():
            keepers.add(json.loads(best.read_text())["checkpoint"])
        newest = max((int(n.split("_")[1]) for n in keepers), default=-1)
        for p in _step_dirs(self.dir):
            if p.name not in keepers and (saved(p) or _step(p) < newest):
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, states: dict[str, Stateful]) -> list[str]:
        """Restore every named state that `path` holds into the live objects; returns the names
        it did not hold (a state added since, or another rank's RNG), which keep their values.
        `path` comes from `find_resume`, which verified it."""
        if not saved(path):
            raise FileNotFoundError(f"train.resume: '{path}' is not a complete checkpoint (no {integrity.METADATA})")
        keys = saved_keys(path)
        held = {n: s for n, s in states.items() if any(k.startswith(f"{n}.") for k in keys)}
        sd = {}
        for name, obj in held.items():
            sd[name] = obj.state_dict()
            for key in getattr(obj, "optional_keys", ()):  # e.g. a device RNG the saving run had not
                if f"{name}.{key}" not in keys:
                    sd[name].pop(key, None)
        _load(sd, path, process_group=self.group)
        for name, obj in held.items():
            obj.load_state_dict(sd[name])
        return sorted(set(states) - set(held))


# ---- loading ---------------------------------------------------------------------------------------

def _load(sd: dict, path: Path, **kw) -> None:
    """dcp.load with the safe reader and planner; any failure is one line naming the checkpoint,
    not DCP's CheckpointException with every rank's traceback."""
    try:
        dcp.load(sd, storage_reader=integrity.SafeReader(str(path)), planner=integrity.SafeLoadPlanner(path), **kw)
    except CheckpointException as e:
        for failure in e.failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, integrity.CheckpointError):
                raise exc from None
        exc = next(iter(e.failures.values()))
        exc = exc[0] if isinstance(exc, tuple) else exc
        raise integrity.CheckpointError(f"checkpoint '{path}' cannot be loaded ({type(exc).__name__}: "
                                        f"{integrity.short_reason(exc)})") from None


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
    """`auto`: the newest intact checkpoint of the run dir (None for a fresh run); `off`; or a path.

    Every rank calls it and all get the same answer (`integrity.check` agrees across ranks). A damaged
    checkpoint met by `auto` is moved to checkpoints/damaged/ (by rank 0; a later save at that step
    must not find it) and named in one warning; `auto` finding only damaged ones, or an explicit
    path that is damaged, raises integrity.DamagedCheckpoint."""
    if resume == "off":
        return None
    if resume != "auto":
        path = Path(resume)
        if not saved(path):
            raise FileNotFoundError(f"train.resume: '{path}' is not a complete checkpoint directory")
        if complete(path) and (problem := integrity.check(path)):
            raise integrity.DamagedCheckpoint(f"train.resume: checkpoint '{path}' is damaged ({problem})")
        if not complete(path):
            _warn_unverified(path)
        return path
    ckpt_dir = Path(run_dir) / "checkpoints"
    found, damaged = None, []
    for path in reversed(checkpoints(ckpt_dir)):
        if (problem := integrity.check(path)) is None:
            found = path
            break
        damaged.append((path, problem))
    if found is None:  # no manifest anywhere: checkpoints written before checksums
        found = next((p for p in reversed(_step_dirs(ckpt_dir)) if saved(p) and not complete(p)), None)
        if found is None and damaged:
            raise integrity.DamagedCheckpoint(f"train.resume=auto: no intact checkpoint in '{ckpt_dir}' ("
                                    + "; ".join(f"{p.name}: {why}" for p, why in damaged)
                                    + "); train.resume=off starts over")
        if found is not None:
            _warn_unverified(found)
    rank = dist.get_rank() if dist.is_initialized() else 0
    for path, problem in damaged:
        if rank == 0:
            dest = ckpt_dir / DAMAGED / path.name
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(exist_ok=True)
            path.rename(dest)
            log.warning("checkpoint %s is damaged (%s): moved to %s; resuming from %s", path.name, problem, dest,
                        found.name)
    return found


def _warn_unverified(path: Path) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.warning("checkpoint %s has no %s (written before checksums, or its save was cut short at the "
                    "end): its files are not verified", path, integrity.MANIFEST)


def load_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under `prefix` (e.g. "model.") from all shards, on the CPU,
    without a live model and without reading any non-tensor value (export, evaluation).
    A damaged checkpoint is refused (integrity.DamagedCheckpoint, one line)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if complete(path):
        if problem := integrity.check(path):
            raise integrity.DamagedCheckpoint(f"checkpoint '{path}' is damaged ({problem})")
    elif saved(path):
        _warn_unverified(path)
    meta = integrity.read_metadata(path).state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not sd:
        raise FileNotFoundError(f"no tensors under '{prefix.rstrip('.')}' in checkpoint '{path}'")
    _load(sd, path, no_dist=True)
    return {k[len(prefix):]: v for k, v in sd.items()}
