"""Sharded checkpoints on torch.distributed.checkpoint (DCP), saved in the background.

Layout: `<run>/checkpoints/step_<n>/` holds every rank's shard plus DCP's `.metadata`, which DCP
writes (tmp file + rename) only after *all* ranks reported their writes: a directory without it is
an interrupted save and is never resumed from. `latest` names the newest complete one and
`best.json` the best by val top-1; the last `keep` (and the best) survive purging.

What is saved: model and optimizer (DCP reshards both, so W ranks' checkpoint loads on W'),
LR scheduler, GradScaler, TrainState (epoch, global step, global samples consumed in the epoch),
the resolved config, and each rank's RNG states under its own key.
"""

from __future__ import annotations

import io
import logging
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from train.loop import TrainState

log = logging.getLogger("resnet")
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
METADATA = ".metadata"


def _bytes(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def _unbytes(buf: io.BytesIO):
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete(path: Path) -> bool:
    return (path / METADATA).is_file()


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [p for p in ckpt_dir.glob("step_*") if p.is_dir() and complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest(ckpt_dir: Path) -> Path | None:
    found = checkpoints(ckpt_dir)
    return found[-1] if found else None


class Checkpointer:
    def __init__(self, run_dir: Path, rank: int, world_size: int, keep: int = 3,
                 async_save: bool = True, keep_best: bool = True):
        self.dir = run_dir / "checkpoints"
        self.rank, self.world, self.keep, self.keep_best = rank, world_size, keep, keep_best
        self.async_save = async_save
        self.pending = None  # (AsyncSaveResponse, path, top1) of the save in flight
        self.stager = None
        if async_save:  # one stager for the run: it keeps its (pinned, on CUDA) host buffers
            cuda = torch.cuda.is_available()
            self.stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                       use_async_staging=True, use_non_blocking_copy=cuda))
        # Background saves run their collectives on a group of their own, so they never
        # interleave with DDP's all-reduces on the default group (as torchtitan does).
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)

    def state_dict(self, model, optimizer, scheduler, scaler, state: TrainState, config: dict) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        extra = {"train_state": vars(state).copy(), "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict(), "config": config, "world_size": self.world}
        return {"model": model_sd, "optim": optim_sd, "extra": _bytes(extra),
                f"rng_rank{self.rank}": _bytes(rng_state())}

    def save(self, model, optimizer, scheduler, scaler, state: TrainState, config: dict,
             top1: float | None = None) -> Path:
        """Start writing step_<n>; returns as soon as the state is copied (async) or written."""
        self.wait()
        path = self.dir / f"step_{state.step}"
        if complete(path):
            return path  # already saved at this step (e.g. end of epoch and end of run)
        sd = self.state_dict(model, optimizer, scheduler, scaler, state, config)
        if self.async_save:
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
        if top1 is not None and self.keep_best:
            import json

            prev = json.loads(best.read_text())["top1"] if best.exists() else -1.0
            if top1 > prev:
                best.write_text(json.dumps({"checkpoint": path.name, "top1": top1}))
        self.purge()

    def purge(self) -> None:
        import json

        keepers = set(p.name for p in checkpoints(self.dir)[-self.keep:])
        best = self.dir / "best.json"
        if self.keep_best and best.exists():
            keepers.add(json.loads(best.read_text())["checkpoint"])
        newest = max((int(n.split("_")[1]) for n in keepers), default=-1)
        for p in self.dir.glob("step_*"):
            step = int(p.name.split("_")[1])
            if p.name not in keepers and (complete(p) or step < newest):
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path, model, optimizer, scheduler, scaler) -> TrainState:
        """Restore everything saved at `path` into the live objects; returns the TrainState."""
        if not complete(path):
            raise FileNotFoundError(f"train.resume: '{path}' is not a complete checkpoint (no {METADATA})")
        sd = self.state_dict(model, optimizer, scheduler, scaler, TrainState(), {})
        keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        own_rng = f"rng_rank{self.rank}"
        if not any(k.startswith(own_rng) for k in keys):
            sd.pop(own_rng)  # more ranks now than when saved: this rank keeps its fresh seed
        dcp.load(sd, checkpoint_id=str(path), process_group=self.group)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        extra = _unbytes(sd["extra"])
        scheduler.load_state_dict(extra["scheduler"])
        scaler.load_state_dict(extra["scaler"])
        if own_rng in sd and extra["world_size"] == self.world:
            set_rng_state(_unbytes(sd[own_rng]))
        return TrainState(**extra["train_state"])


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
