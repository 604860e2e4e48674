"""Faults and hostile input (issue 21): a damaged checkpoint, a full disk, two launches into one
run directory, pickled code in a checkpoint, a YAML tag, a .pth with code; and a CPU-written
checkpoint on a CUDA machine (issue 20). Each ends in one line (or a named fallback), with
nothing executed and nothing lost: the runs that go on end with the weights of an undisturbed run."""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import filesystem

from tests.conftest import ROOT, run_trainer, write_config
from tests.distributed_helpers import run_ranks
from train import checkpoint as ckpt_lib
from train import runlock
from train.checkpoint import (
    Checkpointer,
    ModelState,
    OptimizerState,
    RNGState,
    Value,
    find_resume,
    load_tensors,
    load_value,
    saved_keys,
)
from train.config import CheckpointConfig, ConfigError
from train.distributed import DistInfo
from train.export import model_state_dict
from train.integrity import (
    MANIFEST,
    CheckpointError,
    CheckpointSaveError,
    DamagedCheckpoint,
    UnsafeCheckpoint,
    check,
    file_crc32,
    human_bytes,
)

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
COMMON = ("train.max_steps=6", "checkpoint.every_steps=2", "log.tensorboard=false")


class Evil:
    """Unpickling this runs a shell command that leaves `marker` behind."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def forge_manifest(path: Path) -> None:
    """What someone who replaced a file would do next: record the new file's checksum."""
    files = {p.name: {"bytes": p.stat().st_size, "crc32": file_crc32(p)} for p in path.iterdir()
             if p.name != MANIFEST}
    (path / MANIFEST).write_text(json.dumps({"format": 1, "checksum": "crc32", "files": files}))


def model_and_opt(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    return model, opt


def save_steps(run: Path, steps=(1, 2, 3), **cfg) -> tuple[Checkpointer, dict[int, dict]]:
    """Checkpoints of a tiny model at `steps` (weights change between them); returns each step's weights."""
    model, opt = model_and_opt()
    c = Checkpointer(CheckpointConfig(**{"async_save": False, **cfg}), run, CPU)
    weights = {}
    for step in steps:
        with torch.no_grad():
            model[0].weight.add_(1.0)
        c.save({"model": ModelState(model), "optim": OptimizerState(model, opt), "note": Value({"step": step})},
               step=step)
        c.wait()
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return c, weights


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---- integrity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("async_save", [False, True])
def test_manifest_records_every_file_before_latest(tmp_path, async_save):
    c, _ = save_steps(tmp_path, steps=(1,), async_save=async_save)
    path = tmp_path / "checkpoints/step_1"
    files = json.loads((path / MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in path.iterdir()} - {MANIFEST} == {".metadata", "__0_0.distcp"}
    for name, entry in files.items():
        assert entry == {"bytes": (path / name).stat().st_size, "crc32": file_crc32(path / name)}
    assert check(path) is None and (tmp_path / "checkpoints/latest").read_text() == "step_1\n"


def truncate(f: Path):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return f"__0_0.distcp has {len(data) // 2} bytes, {len(data)} were written"


def flip_bit(f: Path):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    return "__0_0.distcp fails its CRC-32 check"


def pickle_over(f: Path, marker: Path):
    size = f.stat().st_size
    f.write_bytes(pickle.dumps(Evil(marker)))
    return f"{f.name} has {f.stat().st_size} bytes, {size} were written"


@pytest.mark.parametrize("damage", ["truncate", "flip", "shard_pickle", "metadata_pickle", "missing", "manifest"])
def test_damaged_newest_is_named_and_resume_takes_the_newest_intact(tmp_path, caplog, damage):
    _, weights = save_steps(tmp_path)
    ckpts, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    bad, shard = ckpts / "step_3", ckpts / "step_3/__0_0.distcp"
    if damage == "truncate":
        why = truncate(shard)
    elif damage == "flip":
        why = flip_bit(shard)
    elif damage == "shard_pickle":
        why = pickle_over(shard, marker)
    elif damage == "metadata_pickle":
        why = pickle_over(bad / ".metadata", marker)
    elif damage == "missing":
        shard.unlink()
        why = "__0_0.distcp is missing"
    else:
        (bad / MANIFEST).write_text('{"files": ')
        why = "manifest.json is unreadable (Expecting value: line 1 column 11 (char 10))"
    # an explicit path and the readers of export/evaluate refuse it in one line
    with pytest.raises(DamagedCheckpoint) as e:
        find_resume(str(bad), tmp_path)
    assert str(e.value) == f"train.resume: checkpoint '{bad}' is damaged ({why})"
    with pytest.raises(DamagedCheckpoint) as e:
        load_tensors(bad, "model.")
    assert str(e.value) == f"checkpoint '{bad}' is damaged ({why})"
    # auto: one warning naming it, the newest intact one instead, the damaged one moved aside
    with caplog.at_level(logging.WARNING, logger="resnet"):
        found = find_resume("auto", tmp_path)
    assert found == ckpts / "step_2"
    assert warnings_of(caplog) == [f"checkpoint step_3 is damaged ({why}): moved to {ckpts / 'damaged/step_3'}; "
                                   "resuming from step_2"]
    assert not bad.exists() and (ckpts / "damaged/step_3").is_dir()
    model, opt = model_and_opt(1)
    Checkpointer(CheckpointConfig(async_save=False), tmp_path, CPU).load(
        found, {"model": ModelState(model), "optim": OptimizerState(model, opt)})
    assert all(torch.equal(v, weights[2][k]) for k, v in model.state_dict().items())
    assert not marker.exists()


def test_only_damaged_checkpoints_refuse_auto_in_one_line(tmp_path):
    save_steps(tmp_path, steps=(1,))
    ckpts = tmp_path / "checkpoints"
    why = flip_bit(ckpts / "step_1/__0_0.distcp")
    with pytest.raises(DamagedCheckpoint) as e:
        find_resume("auto", tmp_path)
    assert str(e.value) == (f"train.resume=auto: no intact checkpoint in '{ckpts}' (step_1: {why}); "
                            "train.resume=off starts over")


def test_checkpoints_without_a_manifest_are_read_unverified_only_without_others(tmp_path, caplog):
    _, weights = save_steps(tmp_path)
    ckpts = tmp_path / "checkpoints"
    (ckpts / f"step_3/{MANIFEST}").unlink()  # a save killed between DCP's .metadata and our manifest
    assert find_resume("auto", tmp_path) == ckpts / "step_2" and not warnings_of(caplog)
    for step in (1, 2):  # written before checksums existed
        (ckpts / f"step_{step}/{MANIFEST}").unlink()
    with caplog.at_level(logging.WARNING, logger="resnet"):
        assert find_resume("auto", tmp_path) == ckpts / "step_3"
        assert torch.equal(load_tensors(ckpts / "step_3", "model.")["0.weight"], weights[3]["0.weight"])
    assert warnings_of(caplog) == [f"checkpoint {ckpts / 'step_3'} has no {MANIFEST} (written before checksums, "
                                   "or its save was cut short at the end): its files are not verified"] * 2


def test_a_partial_directory_is_never_resumed_and_is_replaced(tmp_path):
    c, _ = save_steps(tmp_path, steps=(1, 2))
    ckpts = tmp_path / "checkpoints"
    partial = ckpts / "step_3"
    shutil.copytree(ckpts / "step_2", partial)
    (partial / ".metadata").unlink()  # shards written, killed before DCP's commit
    (partial / "__7_0.distcp").write_bytes(b"a rank of a larger run")
    assert find_resume("auto", tmp_path) == ckpts / "step_2"
    model, opt = model_and_opt()
    c.save({"model": ModelState(model), "optim": OptimizerState(model, opt)}, step=3)
    assert sorted(p.name for p in partial.iterdir()) == [".metadata", "__0_0.distcp", MANIFEST]
    assert check(partial) is None


# ---- no unpickling on any load path ----------------------------------------------------------------

def test_pickled_code_in_metadata_never_runs_on_any_load_path(tmp_path):
    save_steps(tmp_path, steps=(1,))
    path, marker = tmp_path / "checkpoints/step_1", tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    forge_manifest(path)  # the checksums pass: the reader alone must refuse it
    expected = (f"checkpoint '{path}': .metadata calls posix.system, which is not DCP metadata; "
                "refusing to unpickle it")
    model, opt = model_and_opt()
    for load in (lambda: find_resume(str(path), tmp_path) and load_value(path, "config"),  # resume: the recipe
                 lambda: saved_keys(path), lambda: load_value(path, "note"), lambda: load_tensors(path, "model."),
                 lambda: Checkpointer(CheckpointConfig(), tmp_path, CPU).load(path, {"model": ModelState(model)})):
        with pytest.raises(UnsafeCheckpoint) as e:
            load()
        assert str(e.value) == expected
    assert not marker.exists()


def test_a_shard_replaced_by_a_pickle_is_one_line_not_index_or_eof_error(tmp_path):
    save_steps(tmp_path, steps=(1,))
    path, marker = tmp_path / "checkpoints/step_1", tmp_path / "pwned"
    (path / "__0_0.distcp").write_bytes(pickle.dumps(Evil(marker)) * 400)  # long enough for every offset
    forge_manifest(path)
    model, opt = model_and_opt()
    for load in (lambda: load_tensors(path, "model."), lambda: load_value(path, "note"),
                 lambda: Checkpointer(CheckpointConfig(), tmp_path, CPU).load(
                     path, {"model": ModelState(model), "optim": OptimizerState(model, opt)})):
        with pytest.raises(CheckpointError) as e:
            load()
        assert str(e.value).startswith(f"checkpoint '{path}'") and "\n" not in str(e.value), str(e.value)
    assert not marker.exists()


def test_model_weights_with_pickled_code_is_one_line(tmp_path):
    from train.models import build, load_weights

    marker, pth = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"fc.weight": Evil(marker)}, pth)
    with pytest.raises(ConfigError) as e:
        load_weights(build(_model_cfg(), 4), str(pth))
    assert str(e.value).startswith(f"model.weights: cannot read '{pth}'") and "\n" not in str(e.value)
    assert not marker.exists()


def _model_cfg():
    from train.config import ModelConfig

    return ModelConfig(name="resnet20", stem="cifar")


# ---- full disk ---------------------------------------------------------------------------------------

Usage = collections.namedtuple("usage", "total used free")


class FullDisk(io.RawIOBase):
    def __init__(self, f, error: BaseException, budget: int = 512):
        self.f, self.error, self.budget = f, error, budget

    def writable(self):
        return True

    def write(self, b):
        n = len(memoryview(b))
        if n > self.budget:
            raise self.error
        self.budget -= n
        return self.f.write(b)

    def tell(self):
        return self.f.tell()

    def flush(self):
        return self.f.flush()

    def fileno(self):
        return self.f.fileno()


def fill_disk_at(monkeypatch, step: int, error: BaseException, free: int = 2**20):
    create = filesystem.FileSystem.create_stream

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with create(self, path, mode) as stream:
            yield FullDisk(stream, error) if f"step_{step}" in Path(path).parts and "w" in mode else stream

    monkeypatch.setattr(filesystem.FileSystem, "create_stream", create_stream)
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", lambda p: Usage(2**40, 0, free))


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
ENFORCE = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("error, reason", [(ENOSPC, "[Errno 28] No space left on device"),
                                           (ENFORCE, "[enforce fail at inline_container.cc:672] . unexpected pos "
                                                     "704 vs 598")])
def test_a_write_error_stops_in_one_line_with_the_previous_checkpoint_intact(tmp_path, monkeypatch, async_save,
                                                                             error, reason):
    c, weights = save_steps(tmp_path, steps=(1,), async_save=async_save)
    ckpts = tmp_path / "checkpoints"
    needed = sum(f["bytes"] for f in json.loads((ckpts / f"step_1/{MANIFEST}").read_text())["files"].values())
    fill_disk_at(monkeypatch, 2, error)
    model, opt = model_and_opt(5)
    with pytest.raises(CheckpointSaveError) as e:
        c.save({"model": ModelState(model), "optim": OptimizerState(model, opt)}, step=2)
        c.wait()
    assert str(e.value) == (f"checkpoint: writing '{ckpts / 'step_2'}' failed ({reason}): needs "
                            f"{human_bytes(needed)}, 1.0 MiB free; step_1 is the newest complete checkpoint")
    assert not (ckpts / "step_2").exists() and check(ckpts / "step_1") is None
    assert find_resume("auto", tmp_path) == ckpts / "step_1"
    assert torch.equal(load_tensors(ckpts / "step_1", "model.")["0.weight"], weights[1]["0.weight"])


def test_no_room_for_a_save_is_found_before_writing(tmp_path, monkeypatch, caplog):
    c, _ = save_steps(tmp_path, steps=(1,), on_error="skip")
    ckpts = tmp_path / "checkpoints"
    needed = sum(f["bytes"] for f in json.loads((ckpts / f"step_1/{MANIFEST}").read_text())["files"].values())
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", lambda p: Usage(2**40, 0, needed - 1))
    model, opt = model_and_opt(5)
    states = {"model": ModelState(model), "optim": OptimizerState(model, opt)}
    with caplog.at_level(logging.WARNING, logger="resnet"):
        c.save(states, step=2)
        c.save(states, step=2)  # the end-of-epoch save at the same step: not retried
    assert warnings_of(caplog) == [
        f"SKIPPED step_2 (checkpoint.on_error=skip), training goes on: checkpoint: not enough space for step_2 in "
        f"'{ckpts}': needs {human_bytes(needed)}, {human_bytes(needed - 1)} free; step_1 is the newest complete "
        "checkpoint"]
    assert not (ckpts / "step_2").exists()
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", lambda p: Usage(2**40, 0, 2**40))
    c.save(states, step=3)  # room again: saving goes on
    assert check(ckpts / "step_3") is None


def test_a_failed_manifest_write_is_a_failed_save(tmp_path, monkeypatch):
    c, _ = save_steps(tmp_path, steps=(1,))
    ckpts, real = tmp_path / "checkpoints", json.dump

    def dump(obj, f, **kw):
        if "checksum" in obj:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, **kw)

    monkeypatch.setattr(ckpt_lib.json, "dump", dump)
    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", lambda p: Usage(2**40, 0, 2**40))
    model, opt = model_and_opt(5)
    with pytest.raises(CheckpointSaveError) as e:
        c.save({"model": ModelState(model), "optim": OptimizerState(model, opt)}, step=2)
    assert str(e.value).startswith(f"checkpoint: writing '{ckpts / 'step_2' / MANIFEST}' failed ([Errno 28] No "
                                   "space left on device): needs ")
    assert not (ckpts / "step_2").exists() and find_resume("auto", tmp_path) == ckpts / "step_1"


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (root only; skipped elsewhere): a disk that really fills up."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_really_full_disk_is_one_line_and_the_previous_checkpoint_loads(small_fs, async_save):
    c, weights = save_steps(small_fs, steps=(1,), async_save=async_save)
    ckpts = small_fs / "checkpoints"
    needed = sum(f["bytes"] for f in json.loads((ckpts / f"step_1/{MANIFEST}").read_text())["files"].values())
    (small_fs / "junk").write_bytes(b"x" * (shutil.disk_usage(small_fs).free - needed - 512))  # passes the check
    model, opt = model_and_opt(5)
    with pytest.raises(CheckpointSaveError) as e:
        c.save({"model": ModelState(model), "optim": OptimizerState(model, opt)}, step=2)
        c.wait()
    head, tail = str(e.value).split(" failed (", 1)
    assert head == f"checkpoint: writing '{ckpts / 'step_2'}'" and "\n" not in tail, str(e.value)
    assert tail.split("): ", 1)[1] == (f"needs {human_bytes(needed)}, {human_bytes(shutil.disk_usage(small_fs).free)} "
                                       "free; step_1 is the newest complete checkpoint")
    assert not (ckpts / "step_2").exists() and check(ckpts / "step_1") is None
    assert torch.equal(load_tensors(ckpts / "step_1", "model.")["0.weight"], weights[1]["0.weight"])


# ---- the device RNG and async staging (issue 20) -------------------------------------------------------

class FakeCudaRNG:
    """torch.cuda's generator calls on a machine without CUDA: records what a GPU run would do."""

    def __init__(self, monkeypatch):
        self.state, self.set_to = torch.arange(16, dtype=torch.uint8), None
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.state.clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)

    def _set(self, state, device="cuda"):
        self.set_to = state.clone()


@pytest.mark.parametrize("saved_on, resumed_on", [("cpu", "cuda"), ("cuda", "cpu"), ("cuda", "cuda")])
def test_rng_state_resumes_across_devices(tmp_path, monkeypatch, saved_on, resumed_on):
    fake = FakeCudaRNG(monkeypatch)
    c = Checkpointer(CheckpointConfig(async_save=False), tmp_path, CPU)
    torch.manual_seed(3)
    path = c.save({"rng_rank0": RNGState(1, saved_on)}, step=1)
    expected = torch.rand(3)
    torch.manual_seed(9)
    missing = c.load(path, {"rng_rank0": RNGState(1, resumed_on)})  # strict DCP load: no "missing key ...cuda"
    assert missing == [] and torch.equal(torch.rand(3), expected)
    if saved_on == resumed_on == "cuda":
        assert torch.equal(fake.set_to, fake.state)
    else:
        assert fake.set_to is None  # a CPU-written checkpoint keeps the GPU's seeded generator


def test_a_run_on_the_cpu_touches_no_cuda_where_a_gpu_is_visible(tmp_path, monkeypatch):
    def touched(*a, **k):
        raise AssertionError("CUDA touched")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    for name in ("get_rng_state", "set_rng_state", "current_stream", "synchronize", "init"):
        monkeypatch.setattr(torch.cuda, name, touched)
    monkeypatch.setattr(torch, "Stream", touched)
    model, opt = model_and_opt()
    c = Checkpointer(CheckpointConfig(async_save=True), tmp_path, CPU)
    states = {"model": ModelState(model), "optim": OptimizerState(model, opt), "rng_rank0": RNGState(1, "cpu")}
    path = c.save(states, step=1)
    c.close()
    c.load(path, states)
    assert check(path) is None


def test_async_staging_is_done_before_the_weights_change(tmp_path, monkeypatch):
    """The copy must be finished before the next forward (BN buffers) and optimizer step change
    the tensors. CPU: staged before save() returns. CUDA (by mechanism): the compute stream is
    synchronized before the stager's side stream reads, and wait_staged() waits for its copy."""
    model, opt = model_and_opt()
    c = Checkpointer(CheckpointConfig(async_save=True), tmp_path, CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = c.save({"model": ModelState(model)}, step=1)
    c.wait_staged()
    with torch.no_grad():  # what the next optimizer step does, while the upload runs
        for p in model.parameters():
            p.add_(1.0)
    c.wait()
    saved = load_tensors(path, "model.")
    assert all(torch.equal(saved[k], v) for k, v in before.items())

    order, options = [], []

    class Stream:
        def synchronize(self):
            order.append("compute stream synchronized")

    real_stager = ckpt_lib.DefaultStager

    def stager(opts):  # the pinned-memory stager a GPU run gets, made to run on this CPU
        options.append(opts)
        return real_stager(ckpt_lib.StagingOptions(False, False, True, False))

    real_async_save = ckpt_lib.dcp.async_save

    def async_save(*a, **k):
        order.append("staging starts")
        return real_async_save(*a, **k)

    monkeypatch.setattr(ckpt_lib, "DefaultStager", stager)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(ckpt_lib.dcp, "async_save", async_save)
    gpu = Checkpointer(CheckpointConfig(async_save=True), tmp_path / "gpu", DistInfo(0, 1, 0, torch.device("cuda", 0)))
    assert (options[0].use_pinned_memory, options[0].use_async_staging, options[0].use_non_blocking_copy) == (
        True, True, True)
    gpu.save({"model": ModelState(model)}, step=1)
    assert order == ["compute stream synchronized", "staging starts"]
    assert gpu.pending.staged is not None  # wait_staged() blocks on it before the next forward
    gpu.close()


# ---- one run directory, one run -------------------------------------------------------------------------

def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def write_lock(run: Path, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lock = run / runlock.LOCK
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "2026-01-01 00:00:00 UTC",
                                "job": "", "token": "theirs", **holder}))
    return lock


@pytest.mark.parametrize("holder, age, stale", [
    ({"pid": "dead"}, 0, "its process {pid} is gone"),
    ({}, 0, None),  # this very process: alive
    ({"host": "elsewhere"}, 10, None),
    ({"host": "elsewhere"}, runlock.STALE_AFTER_S + 100, f"no heartbeat for {runlock.STALE_AFTER_S + 100:.0f} s"),
    ({"host": "elsewhere", "job": "slurm:42"}, 10, "it was taken by this job (slurm:42) before it was restarted"),
])
def test_a_lock_is_stale_only_when_its_holder_is_gone(tmp_path, monkeypatch, caplog, holder, age, stale):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    if holder.get("pid") == "dead":
        holder["pid"] = dead_pid()
    lock = write_lock(tmp_path, **holder)
    os.utime(lock, (time.time() - age, time.time() - age))
    held = json.loads(lock.read_text())
    mine = runlock.RunLock(tmp_path)
    with caplog.at_level(logging.WARNING, logger="resnet"):
        if stale is None:
            with pytest.raises(runlock.RunLocked) as e:
                mine.acquire()
            assert str(e.value) == (f"run directory '{tmp_path}' is in use by another run: host {held['host']} pid "
                                    f"{held['pid']} since 2026-01-01 00:00:00 UTC; wait for it to end or choose "
                                    "another log.name")
            assert json.loads(lock.read_text())["token"] == "theirs"
            return
        mine.acquire()
    try:
        assert warnings_of(caplog) == [f"taking over {lock} of {runlock.describe(held)}: "
                                       + stale.format(pid=held["pid"])]
        assert json.loads(lock.read_text())["token"] == mine.token
    finally:
        mine.release()
    assert not lock.exists()


def _hold(rank, world, run):
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    try:
        with runlock.hold(Path(run), info):
            return "held"
    except runlock.RunLocked as e:
        return str(e)


def test_every_rank_refuses_alike(tmp_path):
    lock = write_lock(tmp_path)
    held = json.loads(lock.read_text())
    refused = run_ranks(_hold, 2, str(tmp_path))
    assert refused[0] == refused[1] == (f"run directory '{tmp_path}' is in use by another run: host {held['host']} "
                                        f"pid {held['pid']} since 2026-01-01 00:00:00 UTC; wait for it to end or "
                                        "choose another log.name")
    lock.unlink()
    assert run_ranks(_hold, 2, str(tmp_path)) == ["held", "held"] and not lock.exists()


# ---- the trainer, end to end (2 ranks unless said) ------------------------------------------------------

@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_data):
    """An undisturbed run: 6 steps, checkpoints at 2, 4, 6."""
    tmp = tmp_path_factory.mktemp("faults")
    cfg = write_config(tmp, tiny_data)
    run_trainer(cfg, "log.name=ref", *COMMON, nproc=2)
    return tmp, cfg


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = model_state_dict(a), model_state_dict(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def messages(out: str, needle: str) -> list[str]:
    """Logged lines holding `needle`, without the time and rank prefix."""
    return [line.split("] ", 1)[1] for line in out.splitlines() if needle in line and "] " in line]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("error:", "config error:"))]


def test_a_flipped_bit_in_the_newest_checkpoint_is_never_trained_on(ref):
    tmp, cfg = ref
    run_trainer(cfg, "log.name=hurt", *COMMON[1:], "train.max_steps=4", nproc=2)
    ckpts = tmp / "runs/hurt/checkpoints"
    flip_bit_in = ckpts / "step_4/__1_0.distcp"  # rank 1's shard: rank 0 is not the one who reads it
    data = bytearray(flip_bit_in.read_bytes())
    data[len(data) // 2] ^= 1
    flip_bit_in.write_bytes(bytes(data))
    r = run_trainer(cfg, "log.name=hurt", *COMMON, nproc=2)
    assert messages(r.stdout, "is damaged") == [f"checkpoint step_4 is damaged (__1_0.distcp fails its CRC-32 "
                                                f"check): moved to {ckpts / 'damaged/step_4'}; resuming from step_2"]
    assert_same_weights(tmp / "runs/ref", tmp / "runs/hurt")


def launch_with_full_disk(cfg: Path, *overrides: str, step: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "FAULT_STEP": str(step)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/fault_inject.py", "--config", str(cfg), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_a_full_disk_stops_with_exit_4_and_the_resume_loses_nothing(ref):
    tmp, cfg = ref
    ckpts = tmp / "runs/full/checkpoints"
    r = launch_with_full_disk(cfg, "log.name=full", *COMMON, "checkpoint.on_error=stop", step=4)
    needed = sum(f["bytes"] for f in json.loads((ckpts / f"step_2/{MANIFEST}").read_text())["files"].values())
    assert errors(r.stderr) == [f"error: checkpoint: writing '{ckpts / 'step_4'}' failed ([Errno 28] No space left "
                                f"on device): needs {human_bytes(needed)}, 1.0 MiB free; step_2 is the newest "
                                "complete checkpoint"], r.stderr[-3000:]
    assert "exitcode  : 4" in r.stderr and r.returncode != 0
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_2"] and check(ckpts / "step_2") is None
    run_trainer(cfg, "log.name=full", *COMMON, nproc=2)  # the disk has room again
    assert_same_weights(tmp / "runs/ref", tmp / "runs/full")


def test_a_full_disk_with_on_error_skip_warns_once_and_trains_on(ref):
    tmp, cfg = ref
    ckpts = tmp / "runs/skip/checkpoints"
    r = launch_with_full_disk(cfg, "log.name=skip", *COMMON, "checkpoint.on_error=skip", step=4)
    assert r.returncode == 0, r.stderr[-3000:]
    needed = sum(f["bytes"] for f in json.loads((ckpts / f"step_2/{MANIFEST}").read_text())["files"].values())
    assert messages(r.stdout, "SKIPPED") == [
        f"SKIPPED step_4 (checkpoint.on_error=skip), training goes on: checkpoint: writing '{ckpts / 'step_4'}' "
        f"failed ([Errno 28] No space left on device): needs {human_bytes(needed)}, 1.0 MiB free; step_2 is the "
        "newest complete checkpoint"]
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_2", "step_6"]
    assert_same_weights(tmp / "runs/ref", tmp / "runs/skip")


def test_a_second_launch_into_a_run_directory_refuses_in_one_line(ref):
    tmp, cfg = ref
    run = tmp / "runs/twice"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SLURM_JOB_ID", None)
    first = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "train/main.py", "--config", str(cfg), "log.name=twice", *COMMON], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not (run / runlock.LOCK).is_file():
            assert first.poll() is None and time.time() - t0 < 300, "the first launch never took the lock"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGSTOP)  # it holds the run dir, alive, for as long as we need
        try:
            holder = json.loads((run / runlock.LOCK).read_text())
            second = run_trainer(cfg, "log.name=twice", *COMMON, nproc=1, check=False)
        finally:
            os.killpg(first.pid, signal.SIGCONT)
        out, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert second.returncode == 5
    assert second.stderr.strip().splitlines() == [
        f"error: run directory '{run}' is in use by another run: host {socket.gethostname()} pid {holder['pid']} "
        f"since {holder['start']}, torchrun job {holder['job'].split(':', 1)[1]}; wait for it to end or choose "
        "another log.name"]
    assert first.returncode == 0, out[-3000:]
    assert_same_weights(tmp / "runs/ref", run)


def test_the_lock_of_a_killed_run_does_not_block_its_resume(ref):
    tmp, cfg = ref
    run = tmp / "runs/killed"
    shutil.copytree(tmp / "runs/ref/checkpoints/step_2", run / "checkpoints/step_2")  # what the killed run saved
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from train.runlock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
                               str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    held = json.loads((run / runlock.LOCK).read_text())
    holder.kill()  # kill -9: the lock stays behind
    holder.wait()
    r = run_trainer(cfg, "log.name=killed", *COMMON, nproc=2)
    assert messages(r.stdout, "taking over") == [f"taking over {run / runlock.LOCK} of host {held['host']} pid "
                                                 f"{held['pid']} since {held['start']}: its process {held['pid']} "
                                                 "is gone"]
    assert not (run / runlock.LOCK).exists()  # released at the end
    assert_same_weights(tmp / "runs/ref", run)


def test_pickled_code_in_a_checkpoint_never_runs_on_resume_evaluate_or_export(ref):
    tmp, cfg = ref
    marker = tmp / "pwned"
    run = tmp / "runs/evil"
    shutil.copytree(tmp / "runs/ref", run)
    path = run / "checkpoints/step_6"
    (path / ".metadata").write_bytes(pickle.dumps(Evil(marker)))
    forge_manifest(path)
    line = (f"error: checkpoint '{path}': .metadata calls posix.system, which is not DCP metadata; refusing to "
            "unpickle it")
    resume = run_trainer(cfg, "log.name=evil", *COMMON, "train.max_steps=8", nproc=1, check=False)
    export = subprocess.run([sys.executable, "-m", "train.export", str(run), str(tmp / "evil.pth")], cwd=ROOT,
                            capture_output=True, text=True)
    evaluate = subprocess.run([sys.executable, "-m", "train.evaluate", str(path)], cwd=ROOT, capture_output=True,
                              text=True)
    for r in (resume, export, evaluate):
        assert (r.returncode, r.stderr.strip().splitlines()) == (2, [line]), r.stderr[-2000:]
    assert not marker.exists() and not (tmp / "evil.pth").exists()


def test_a_damaged_checkpoint_is_refused_by_evaluate_and_export_in_one_line(ref):
    tmp, _ = ref
    run = tmp / "runs/broken"
    shutil.copytree(tmp / "runs/ref", run)
    path = run / "checkpoints/step_6"
    shard = path / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])  # a copy cut short
    line = f"error: checkpoint '{path}' is damaged (__0_0.distcp has {size // 2} bytes, {size} were written)"
    for cmd in (["train.export", str(run), str(tmp / "broken.pth")], ["train.evaluate", str(run)]):
        r = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True)
        assert (r.returncode, r.stderr.strip().splitlines()) == (2, [line]), r.stderr[-2000:]


def test_yaml_tags_and_pickled_pth_files_are_one_line_and_never_run(ref):
    tmp, cfg = ref
    marker = tmp / "pwned"
    evil_yaml = tmp / "evil.yaml"
    evil_yaml.write_text(f'data: !!python/object/apply:os.system ["touch {marker}"]\n')
    tag = ("not plain YAML (could not determine a constructor for the tag "
           "'tag:yaml.org,2002:python/object/apply:os.system')")
    train = subprocess.run([sys.executable, "train/main.py", "--config", str(evil_yaml)], cwd=ROOT,
                           capture_output=True, text=True)
    assert (train.returncode, train.stderr.strip().splitlines()) == (
        2, [f"config error: --config: '{evil_yaml}' line 1: {tag}"])
    evaluate = subprocess.run([sys.executable, "-m", "train.evaluate", str(tmp / "runs/ref"), "--config",
                               str(evil_yaml)], cwd=ROOT, capture_output=True, text=True)
    assert (evaluate.returncode, evaluate.stderr.strip().splitlines()) == (
        2, [f"error: --config: '{evil_yaml}' line 1: {tag}"])
    pth = tmp / "evil.pth"
    torch.save({"fc.weight": Evil(marker)}, pth)
    r = subprocess.run([sys.executable, "-m", "train.evaluate", str(pth), "--config", str(cfg)], cwd=ROOT,
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr.strip().splitlines()) == (
        2, [f"error: '{pth}' is not a plain weights file; refusing to unpickle it (Trying to load unsupported "
            "GLOBAL posix.system whose module posix is blocked.)"])
    assert not marker.exists()
