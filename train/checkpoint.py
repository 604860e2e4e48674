"""Sharded checkpoints on torch.distributed.checkpoint (DCP), saved in the background, checked on load.

Layout: `<run>/checkpoints/step_<n>/` holds every rank's shard (`__<rank>_0.distcp`), DCP's
`.metadata`, and our `manifest.json`: the size and CRC-32 of every file, written (tmp file + rename)
only after every rank has written and hashed its files. A checkpoint is *complete* when it has
both; only complete ones become `latest`, and a directory without them (an interrupted save, a
full disk) is never resumed from and is removed by the next save or purge. `best.json` names the
best by val top-1; the last `keep` (and the best) survive purging. docs/reliability.md has the
failure cases and exit codes.

Integrity. Each rank hashes the files it wrote in the thread that wrote them, right after writing
(page cache): for async saves that is DCP's background upload thread, so the training loop never
waits for a hash. CRC-32 (zlib) is the fastest check at hand: 1.3-2.6 GB/s against
0.5-1.0 for sha256 and blake2b on the same bytes (2-core Xeon AMX, KVM, load 3-5); it catches
truncation and flipped bits, not forgery (whoever can rewrite a shard can rewrite the manifest; the
loader below is what keeps that harmless). ResNet-50 + SGD momentum (196 MiB): 80-160 ms of CRC-32,
7-16 % of a 1.0-1.7 s synchronous save, none of the 95-180 ms an async save blocks the loop
(`benchmarks/checkpoint.py`).
On load the ranks split the files, verify them and agree on the verdict (`check`):
`train.resume=auto` moves a damaged checkpoint to `checkpoints/damaged/` with one warning and
resumes from the newest intact one; an explicit path, `train.evaluate` and `train.export` refuse a
damaged checkpoint in one line (`DamagedCheckpoint`). A checkpoint with `.metadata` but no manifest
(written before checksums existed, or a save killed between DCP's commit and ours) is read
unverified, with a warning, and only when no checkpoint with a manifest exists.

What is saved is a dict of named states, as in torchtitan: any object with `state_dict()` and
`load_state_dict()` (scheduler, GradScaler, TrainState, EMA weights, ...) is one entry, and
`ModelState` and `OptimizerState` put model and optimizer through DCP's state-dict functions,
so W ranks' checkpoint loads on W'. Adding a state is one line where the dict is built.

Loading runs no pickled code. DCP pickles its `.metadata` and reads it with `pickle.load`:
`SafeReader` reads it with an unpickler that admits DCP's metadata classes only. DCP stores
non-tensor values (a learning rate, a step count) as small pickles and its default planner reads
them with `torch.load(weights_only=False)`: `SafeLoadPlanner` uses `weights_only=True`. Tensors
are read by DCP with `weights_only=True`. Any refusal or unreadable file is one line naming the
checkpoint (`CheckpointError`).

A save that cannot be written (free space below the last checkpoint's size or the state's tensor
bytes, checked before writing; ENOSPC or any other write error) is one line naming the path, the bytes needed and free:
`checkpoint.on_error=stop` exits with code 4 (the previous checkpoint intact), `skip` warns and
trains on.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import shutil
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = logging.getLogger("resnet")
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
# torch.load on a raw pickle (a shard replaced by one) warns about its protocol before we refuse it
warnings.filterwarnings("ignore", message="Detected pickle protocol")
METADATA = ".metadata"
MANIFEST = "manifest.json"
DAMAGED = "damaged"  # checkpoints/damaged/: where resume=auto moves a damaged checkpoint


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, damaged, unsafe): one line naming it; exit 2."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint value that is not plain data (a pickled object that would run code)."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files do not match its manifest (truncated, flipped bits, replaced).
    The ranks agree on the verdict (`check`), so rank 0 alone prints it."""

    same_on_every_rank = True


class CheckpointSaveError(RuntimeError):
    """A save that could not be written, under checkpoint.on_error=stop; exit 4. Decided on rank 0
    and raised with the same message on every rank."""

    same_on_every_rank = True


def short_reason(e: BaseException) -> str:
    """The informative line of an exception: torch.load's weights-only errors put theirs in the
    middle of a paragraph; EOFError() and friends have none (the type then)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(boiler)]
    return (useful or lines or [type(e).__name__])[0]


# ---- reading .metadata without running code ------------------------------------------------------

_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),  # torch.layout pickles as _get_layout(name)
    ("collections", "OrderedDict"), ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
}


class _Refused(pickle.UnpicklingError):
    """A global outside DCP's metadata classes (e.g. `posix.system`)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Admits what torch 2.14's DCP pickles in `.metadata` (its metadata dataclasses, torch.Size,
    dtypes, layouts, a path) and nothing else: every callable a pickle can call comes from here."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


def read_metadata(path: Path) -> Metadata:
    """`path/.metadata`, unpickled by `_MetadataUnpickler`; CheckpointError (one line) otherwise."""
    file = Path(path) / METADATA
    try:
        with open(file, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' has no {METADATA} (an interrupted save?)") from None
    except _Refused as e:
        raise UnsafeCheckpoint(f"checkpoint '{path}': {METADATA} calls {e}, which is not DCP metadata; "
                               "refusing to unpickle it") from None
    except pickle.UnpicklingError as e:
        raise DamagedCheckpoint(f"checkpoint '{path}': {METADATA} is unreadable ({short_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - truncated (EOFError), garbage (ValueError, ...)
        raise DamagedCheckpoint(f"checkpoint '{path}': {METADATA} is unreadable ({type(e).__name__}: "
                                f"{short_reason(e)})") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise DamagedCheckpoint(f"checkpoint '{path}': {METADATA} is not DCP metadata")
    for info in md.storage_data.values():  # shards are files of this directory, nothing else
        name = getattr(info, "relative_path", "")
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise UnsafeCheckpoint(f"checkpoint '{path}': {METADATA} points outside the checkpoint ({name!r})")
    return md


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` read by `read_metadata` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = read_metadata(Path(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id  # as DCP's own read_metadata
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner with its non-tensor values read by the weights-only unpickler."""

    def __init__(self, path: Path | str = "?", **kw):
        super().__init__(**kw)
        self.path = path

    def load_bytes(self, read_item, value) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle.UnpicklingError and friends
            raise UnsafeCheckpoint(f"checkpoint '{self.path}': value '{read_item.dest_index.fqn}' is not plain data; "
                                   f"refusing to unpickle it ({short_reason(e)})") from None
        buf = io.BytesIO()  # the vetted plain value, re-serialised: DCP's own code places it
        torch.save(obj, buf)
        buf.seek(0)
        super().load_bytes(read_item, buf)


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
    return (Path(path) / METADATA).is_file()


def complete(path: Path) -> bool:
    """DCP finished writing it and every rank's files were hashed into its manifest."""
    return saved(path) and (Path(path) / MANIFEST).is_file()


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


def file_crc32(path: Path, chunk: int = 8 << 20) -> str:
    """CRC-32 of a file in 8 MiB reads (zlib releases the GIL while it sums)."""
    crc, buf = 0, bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "crc32": file_crc32(path)}


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"bytes", "crc32"}} of a checkpoint; DamagedCheckpoint if unreadable."""
    try:
        files = json.loads((Path(path) / MANIFEST).read_text())["files"]
        if not files or not all(Path(n).name == n and {"bytes", "crc32"} <= set(v) for n, v in files.items()):
            raise ValueError("no files")
        return files
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpoint(f"checkpoint '{path}': {MANIFEST} is unreadable ({short_reason(e)})") from None


def _verify(path: Path, files: dict[str, dict[str, Any]], names: list[str]) -> str | None:
    for name in names:
        f, want = Path(path) / name, files[name]
        if not f.is_file():
            return f"{name} is missing"
        if (size := f.stat().st_size) != want["bytes"]:
            return f"{name} has {size} bytes, {want['bytes']} were written"
        if file_crc32(f) != want["crc32"]:
            return f"{name} fails its CRC-32 check"
    return None


def check(path: Path) -> str | None:
    """None if every file of `path` has the size and CRC-32 its manifest recorded, else what is
    wrong (one file named). Under torchrun the ranks verify a share of the files each and agree
    on the verdict (one all_gather, the first problem in rank order), so every rank decides alike."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        files = read_manifest(path)
        problem = _verify(path, files, sorted(files)[rank::world])
    except DamagedCheckpoint as e:
        problem = str(e).split(": ", 1)[1]
    except OSError as e:
        problem = short_reason(e)
    if world > 1:
        found: list[str | None] = [None] * world
        dist.all_gather_object(found, problem)
        problem = next((p for p in found if p), None)
    return problem


def saved_keys(path: Path) -> set[str]:
    """Flattened keys held by a checkpoint (`model.conv1.weight`, `scheduler.json`, ...)."""
    return set(read_metadata(path).state_dict_metadata)


# ---- saving ----------------------------------------------------------------------------------------

class _HashingWriter(dcp.FileSystemWriter):
    """DCP's file writer that records the size and CRC-32 of each file it writes, in the thread that
    wrote it (the upload thread of an async save), right after writing it."""

    def __init__(self, path: Path, device: torch.device):
        # per_thread_copy_ahead: DCP's overlapping device-to-host loader, which it picks whenever
        # CUDA is visible and which takes CUDA's current stream (a context on GPU 0), is for CUDA
        # runs only; a run on the CPU gets the serial loader.
        super().__init__(path, **({} if device.type == "cuda" else {"per_thread_copy_ahead": 0}))
        self.files: dict[str, dict[str, Any]] = {}

    def write_data(self, plan, planner) -> torch.futures.Future:
        fut = super().write_data(plan, planner)
        for result in fut.wait():  # FileSystemWriter writes synchronously: the future is done
            name = result.storage_data.relative_path
            if name not in self.files:
                self.files[name] = _describe(Path(self.path) / name)
        return fut

    def finish(self, metadata, results) -> None:  # the coordinator, after every rank wrote
        super().finish(metadata, results)
        self.files[METADATA] = _describe(Path(self.path) / METADATA)


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
    writer: _HashingWriter
    path: Path
    top1: float | None
    needed: int  # bytes the save was expected to take


def human_bytes(n: int | float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _write_failure(e: BaseException) -> str | None:
    """What went wrong in a failed save, if it is a write error (ENOSPC, EIO, torch's zip writer's
    'enforce fail at inline_container.cc'); None for anything else (a bug: re-raised)."""
    if isinstance(e, CheckpointException):
        for failure in e.failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, (OSError, RuntimeError)):
                return short_reason(exc)
        return None
    return short_reason(e) if isinstance(e, (OSError, RuntimeError)) else None


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
        needed = max(self.last_size, _tensor_bytes(sd))  # the last checkpoint or this state; rank 0's counts
        short = False
        if self.rank == 0:
            if path.exists():  # an interrupted save at this step: its files are never reused
                shutil.rmtree(path, ignore_errors=True)
            short = shutil.disk_usage(self.dir).free < needed
        if self._from_rank0(short):  # every rank skips (or stops) together
            self._on_error(path, f"not enough space for {path.name} in '{self.dir}'", needed)
            return path
        writer = _HashingWriter(path, self.device)
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
            if (reason := _write_failure(e)) is None:
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
            if (reason := _write_failure(e)) is None:
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
            return sum(f["bytes"] for f in read_manifest(path).values())
        except DamagedCheckpoint:
            return 0

    def _commit(self, path: Path, writer: _HashingWriter, top1: float | None, needed: int) -> None:
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
                tmp = path / (MANIFEST + ".tmp")
                with open(tmp, "w") as f:
                    json.dump({"format": 1, "checksum": "crc32", "files": dict(sorted(files.items()))}, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                tmp.replace(path / MANIFEST)
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
                reason = f"writing '{path / MANIFEST}' failed ({short_reason(e)})"
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
            message = f"checkpoint: {what}: needs {human_bytes(needed)}, {human_bytes(free)} free; {kept}"
        message = self._from_rank0(message)
        if self.cfg.on_error == "stop":
            raise CheckpointSaveError(message)
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
            raise FileNotFoundError(f"train.resume: '{path}' is not a complete checkpoint (no {METADATA})")
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
        dcp.load(sd, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(path), **kw)
    except CheckpointException as e:
        for failure in e.failures.values():
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, CheckpointError):
                raise exc from None
        exc = next(iter(e.failures.values()))
        exc = exc[0] if isinstance(exc, tuple) else exc
        raise CheckpointError(f"checkpoint '{path}' cannot be loaded ({type(exc).__name__}: "
                              f"{short_reason(exc)})") from None


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

    Every rank calls it and all get the same answer (`check` agrees across ranks). A damaged
    checkpoint met by `auto` is moved to checkpoints/damaged/ (by rank 0; a later save at that step
    must not find it) and named in one warning; `auto` finding only damaged ones, or an explicit
    path that is damaged, raises DamagedCheckpoint."""
    if resume == "off":
        return None
    if resume != "auto":
        path = Path(resume)
        if not saved(path):
            raise FileNotFoundError(f"train.resume: '{path}' is not a complete checkpoint directory")
        if complete(path) and (problem := check(path)):
            raise DamagedCheckpoint(f"train.resume: checkpoint '{path}' is damaged ({problem})")
        if not complete(path):
            _warn_unverified(path)
        return path
    ckpt_dir = Path(run_dir) / "checkpoints"
    found, damaged = None, []
    for path in reversed(checkpoints(ckpt_dir)):
        if (problem := check(path)) is None:
            found = path
            break
        damaged.append((path, problem))
    if found is None:  # no manifest anywhere: checkpoints written before checksums
        found = next((p for p in reversed(_step_dirs(ckpt_dir)) if saved(p) and not complete(p)), None)
        if found is None and damaged:
            raise DamagedCheckpoint(f"train.resume=auto: no intact checkpoint in '{ckpt_dir}' ("
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
                    "end): its files are not verified", path, MANIFEST)


def load_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under `prefix` (e.g. "model.") from all shards, on the CPU,
    without a live model and without reading any non-tensor value (export, evaluation).
    A damaged checkpoint is refused (DamagedCheckpoint, one line)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if complete(path):
        if problem := check(path):
            raise DamagedCheckpoint(f"checkpoint '{path}' is damaged ({problem})")
    elif saved(path):
        _warn_unverified(path)
    meta = read_metadata(path).state_dict_metadata
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
          if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    if not sd:
        raise FileNotFoundError(f"no tensors under '{prefix.rstrip('.')}' in checkpoint '{path}'")
    _load(sd, path, no_dist=True)
    return {k[len(prefix):]: v for k, v in sd.items()}
