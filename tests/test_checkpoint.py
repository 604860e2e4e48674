"""Checkpoint bars: kill -9 under torchrun, crash mid-save, resharding, SIGUSR1, export."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, make_image_folder, run_trainer, write_config
from train.checkpoint import checkpoints, latest
from train.export import model_state_dict


@pytest.fixture(scope="module")
def medium_data(tmp_path_factory) -> Path:
    """256 train images: 16 steps per epoch at 2 ranks x 8, slow enough to interrupt."""
    return make_image_folder(tmp_path_factory.mktemp("medium"), train_per_class=64, val=32)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def start(config: Path, *overrides: str, nproc: int = 2, max_restarts: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", "train/main.py", "--config", str(config), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = model_state_dict(a), model_state_dict(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_kill_9_one_worker_then_torchrun_restarts(tmp_path, medium_data):
    cfg = write_config(tmp_path, medium_data, "\n")
    common = ["checkpoint.every_steps=4", "train.epochs=2"]
    run_trainer(cfg, *common, "log.name=full", nproc=2)
    # one restart is needed; the spare ones only absorb launcher noise on a loaded CI machine
    proc = start(cfg, *common, "log.name=killed", max_restarts=3)
    ckpts = tmp_path / "runs/killed/checkpoints"
    try:
        wait_for(lambda: any(int(p.name[5:]) >= 8 for p in checkpoints(ckpts)))
        workers = children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:  # never leave a torchrun behind when an assertion fails
        if proc.poll() is None:
            for pid in children(proc.pid) + [proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    assert "resumed from" in out
    assert_same_weights(tmp_path / "runs/full", tmp_path / "runs/killed")


def test_crash_during_save_resumes_from_previous(tmp_path, tiny_data):
    """A save cut short leaves shards without DCP's .metadata: never picked for resume."""
    cfg = write_config(tmp_path, tiny_data)
    run_trainer(cfg, "log.name=run", "train.max_steps=4", nproc=2)
    ckpts = tmp_path / "runs/run/checkpoints"
    good = latest(ckpts)
    assert good.name == "step_4"
    partial = ckpts / "step_6"
    shutil.copytree(good, partial)
    (partial / ".metadata").unlink()  # what a kill between shard writes and the commit leaves
    assert latest(ckpts) == good
    r = run_trainer(cfg, "log.name=run", "train.max_steps=6", nproc=2)
    assert "resumed from" in r.stdout and "step_4" in r.stdout
    assert (ckpts / "step_6" / ".metadata").is_file()


def test_kill_9_at_random_moments_leaves_a_loadable_checkpoint(tmp_path, medium_data):
    """Kill the whole job repeatedly while it saves every step; the newest complete checkpoint
    always loads and a resume continues from it."""
    cfg = write_config(tmp_path, medium_data)
    ckpts = tmp_path / "runs/run/checkpoints"
    steps_seen = []
    for jitter in (0.0, 0.07, 0.19):  # kill inside a save, around its commit, between saves
        before = max((int(p.name[5:]) for p in ckpts.glob("step_*")), default=0)
        proc = start(cfg, "checkpoint.every_steps=1", "checkpoint.async_save=true", "log.name=run",
                     "train.epochs=3")
        wait_for(lambda b=before: any(int(p.name[5:]) > b + 1 for p in ckpts.glob("step_*")))
        time.sleep(jitter)
        for pid in children(proc.pid) + [proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        found = latest(ckpts)
        if found is not None:
            sd = model_state_dict(found)  # loads: every shard present
            assert "fc.weight" in sd
            steps_seen.append(int(found.name[5:]))
    assert len(steps_seen) == 3 and steps_seen == sorted(set(steps_seen))  # each restart resumed
    r = run_trainer(cfg, "log.name=run", "train.epochs=3", f"train.max_steps={steps_seen[-1] + 1}", nproc=2)
    assert f"step {steps_seen[-1]}," in r.stdout


def test_checkpoint_of_2_ranks_loads_on_1_and_3(tmp_path, tiny_data):
    cfg = write_config(tmp_path, tiny_data)
    run_trainer(cfg, "log.name=w2", "train.epochs=1", nproc=2)
    top1 = {}
    for w in (1, 3):
        shutil.copytree(tmp_path / "runs/w2/checkpoints", tmp_path / f"runs/w{w}/checkpoints")
        run_trainer(cfg, f"log.name=w{w}", "train.epochs=1", nproc=w)
        top1[w] = json.loads((tmp_path / f"runs/w{w}/summary.json").read_text())["final_top1"]
    top1[2] = json.loads((tmp_path / "runs/w2/summary.json").read_text())["final_top1"]
    assert top1[1] == top1[2] == top1[3]
    assert_same_weights(tmp_path / "runs/w2", tmp_path / "runs/w3")


def test_sigusr1_saves_and_exits_for_requeue(tmp_path, medium_data):
    cfg = write_config(tmp_path, medium_data)
    run_trainer(cfg, "log.name=full", nproc=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # as run_trainer: same math
    cmd = [sys.executable, "train/main.py", "--config", str(cfg), "log.name=sig", "log.every=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (tmp_path / "runs/sig/tb").exists())
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-3000:]
    saved = latest(tmp_path / "runs/sig/checkpoints")
    step = int(saved.name[5:])
    assert 0 < step < 64 and f"saved step {step}" in out
    r = run_trainer(cfg, "log.name=sig", nproc=1)
    assert f"step {step}," in r.stdout
    assert_same_weights(tmp_path / "runs/full", tmp_path / "runs/sig")


def test_export_loads_into_torchvision(tmp_path, tiny_data):
    import torchvision

    cfg = write_config(tmp_path, tiny_data)
    run_trainer(cfg, "log.name=r18", "model.name=resnet18", "model.stem=imagenet", "train.max_steps=2", nproc=1)
    out = tmp_path / "r18.pth"
    subprocess.run([sys.executable, "-m", "train.export", str(tmp_path / "runs/r18"), str(out)], cwd=ROOT, check=True)
    sd = torch.load(out, weights_only=True)
    tv = torchvision.models.resnet18(num_classes=4)
    tv.load_state_dict(sd)  # strict: identical keys and shapes
    from train.config import ModelConfig
    from train.models import build

    ours = build(ModelConfig(name="resnet18", weights=str(out)), 4)
    tv.eval()
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=1e-5)


def test_non_finite_loss_stops_before_any_checkpoint_holds_it(tmp_path, tiny_data):
    """lr 1e6 diverges within a few steps; checkpoints every step must all hold finite weights,
    the error names the problem in one line and the exit code is non-zero."""
    cfg = write_config(tmp_path, tiny_data)
    r = run_trainer(cfg, "log.name=nan", "optim.lr=1e6", "schedule.warmup_epochs=0", "log.every=4",
                    "checkpoint.every_steps=1", nproc=2, check=False)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: non-finite")]
    assert errors and "the last checkpoint is intact" in errors[0]
    ckpts = checkpoints(tmp_path / "runs/nan/checkpoints")
    for path in ckpts:
        sd = model_state_dict(path)
        assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point()), path.name
