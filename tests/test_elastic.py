"""torchrun elasticity on one machine: two torchrun agents on 127.0.0.1 with a c10d rendezvous, one
worker each, stand for two nodes (gloo, CPU).

  * 2 agents x 1 worker train to the same weights as 1 agent x 2 workers.
  * A node lost: under `--nnodes=1:2 --max-restarts=1`, one agent and its worker are killed with
    SIGKILL mid-epoch; the other agent's worker fails in its next collective, the agent restarts
    it, re-rendezvouses alone, and the new worker resumes from the newest complete checkpoint on
    world size 1 and finishes every epoch. Every sample of every epoch is trained exactly once
    across the two phases: each process writes the batches its sampler hands out
    (RESNET_SAMPLE_TRACE, data/sampler.py), cut at the checkpoint the survivor resumed from.
  * The learning rate after that resume continues the uninterrupted run's curve at the same sample
    count, its peak rescaled to the new global batch (train/optim.py: the schedule follows samples).

    .venv/bin/python -m pytest -q tests/test_elastic.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from data.sampler import epoch_order
from tests.conftest import ROOT, make_image_folder, run_trainer, write_config
from train.checkpoint import complete
from train.export import model_state_dict

PER_CLASS, CLASSES, BATCH, EPOCHS = 64, 4, 8, 3
SAMPLES = PER_CLASS * CLASSES  # 256: 16 steps/epoch on 2 ranks, 32 on 1
CKPT_EVERY = 5  # steps; 5, 10, 15, 20, ... are mid-epoch on 2 ranks (16 steps/epoch)
# one intra-op thread per worker on both sides of a comparison; TensorBoard on for train/lr
COMMON = ("dist.device=cpu", "dist.cpu_threads=1", f"train.epochs={EPOCHS}", "log.every=1",
          "log.tensorboard=true")
# Rendezvous: a round with both agents completes when the second joins; a lone agent waits
# last_call_timeout for a second one, then goes alone. That wait must outlast the second agent's
# start-up (else the first round is the first agent alone, and the second one's arrival restarts
# it), and is what the survivor waits after the loss. A dead peer misses its heartbeats in 3 s.
RDZV_CONF = "join_timeout=120,last_call_timeout=20,keep_alive_interval=1,keep_alive_max_attempt=3"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("elastic-data"), classes=CLASSES, train_per_class=PER_CLASS,
                             val=16)


@pytest.fixture(scope="module")
def config(tmp_path_factory, data) -> Path:
    return write_config(tmp_path_factory.mktemp("elastic"), data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent(config: Path, log: Path, port: int, nnodes: str, *overrides: str, max_restarts: int = 0,
          env: dict | None = None) -> subprocess.Popen:
    """One torchrun agent ("node") with one worker, in its own session."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=elastic-{port}",
           f"--rdzv_conf={RDZV_CONF}", f"--max-restarts={max_restarts}", "--monitor-interval=0.2",
           "train/main.py", "--config", str(config), *COMMON, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until the c10d store of the first agent accepts connections (it hosts the rendezvous)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "the first agent exited before its rendezvous store came up"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def descendants(pid: int) -> list[int]:
    """pid's children, grandchildren, ... (from /proc; torchrun starts each worker in a new session)."""
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL an agent and everything it started, as a lost node takes all of them at once."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    for pid in pids[1:]:  # not our children: wait until they are gone
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]:
                break
            time.sleep(0.05)


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if complete(p))


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def assert_close(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert got.keys() == reference.keys()
    differ = [k for k in reference if not torch.allclose(reference[k].double(), got[k].double(),
                                                            rtol=1e-5, atol=1e-6)]
    assert not differ, f"{len(differ)}/{len(reference)} tensors differ: {differ[:5]}"


@pytest.fixture(scope="module")
def reference(config) -> Path:
    """1 agent x 2 workers (torchrun --standalone), uninterrupted: the run both tests compare with."""
    run_trainer(config, *COMMON, "log.name=ref", nproc=2, timeout=600)
    return config.parent / "runs/ref"


def test_two_agents_train_like_one_agent_with_two_workers(config, reference, tmp_path):
    port = free_port()
    logs = [tmp_path / "agent0.log", tmp_path / "agent1.log"]
    a = agent(config, logs[0], port, "2", "log.name=two")
    wait_listening(port, a)
    b = agent(config, logs[1], port, "2", "log.name=two")
    try:
        rcs = [a.wait(timeout=600), b.wait(timeout=600)]
    finally:
        for p in (a, b):
            if p.poll() is None:
                kill_node(p)
    assert rcs == [0, 0], "\n".join(read(log)[-3000:] for log in logs)
    run = config.parent / "runs/two"
    assert checkpoints(run)[-1] == checkpoints(reference)[-1] == EPOCHS * SAMPLES // (2 * BATCH)
    assert_close(model_state_dict(reference), model_state_dict(run))


@pytest.fixture(scope="module")
def lost_node(config, tmp_path_factory) -> dict:
    """Two agents under --nnodes=1:2 --max-restarts=1; the second (not hosting the rendezvous) is
    killed with SIGKILL after the first mid-epoch checkpoint exists."""
    tmp = tmp_path_factory.mktemp("lost")
    trace = tmp / "trace"
    trace.mkdir()
    run = config.parent / "runs/lost"
    port = free_port()
    args = ("log.name=lost", f"checkpoint.every_steps={CKPT_EVERY}", "checkpoint.keep=100")
    logs = [tmp / "survivor.log", tmp / "lost.log"]
    env = {"RESNET_SAMPLE_TRACE": str(trace)}
    a = agent(config, logs[0], port, "1:2", *args, max_restarts=1, env=env)
    try:
        wait_listening(port, a)
        b = agent(config, logs[1], port, "1:2", *args, max_restarts=1, env=env)
        t0 = time.time()
        while not checkpoints(run):
            if time.time() - t0 > 300 or a.poll() is not None or b.poll() is not None:
                raise AssertionError("no checkpoint before the kill:\n" + "\n".join(read(x)[-3000:] for x in logs))
            time.sleep(0.02)
        kill_node(b)
        at_kill = checkpoints(run)
        rc = a.wait(timeout=600)
    finally:
        for p in (a, *(() if "b" not in locals() else (b,))):
            if p.poll() is None:
                kill_node(p)
    return {"rc": rc, "log": read(logs[0]), "run": run, "trace": trace, "at_kill": at_kill}


def trace_batches(trace: Path) -> list[tuple[int, int, int, list[int]]]:
    """(epoch, world size, global position, indices) of every batch any process was handed."""
    out = []
    for f in sorted(trace.glob("*.txt")):
        for line in f.read_text().splitlines():
            epoch, world, pos, *indices = map(int, line.split())
            out.append((epoch, world, pos, indices))
    return out


def resume_point(batches) -> tuple[int, int]:
    """(epoch, global sample) where the world-size-1 phase started."""
    return min((e, pos) for e, w, pos, _ in batches if w == 1)


def test_lost_agent_resumes_alone_and_trains_every_sample_once(lost_node, config):
    log = lost_node["log"]
    assert lost_node["rc"] == 0, log[-5000:]
    run = lost_node["run"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == EPOCHS and summary["world_size"] == 1, summary
    batches = trace_batches(lost_node["trace"])
    assert {w for _, w, _, _ in batches} == {1, 2}
    epoch, sample = resume_point(batches)
    # the survivor resumed from a complete checkpoint at least as new as the newest at the kill,
    # mid-epoch, at that checkpoint's sample position (16 steps/epoch on 2 ranks)
    step = epoch * SAMPLES // (2 * BATCH) + sample // (2 * BATCH)
    assert 0 < sample < SAMPLES and sample % (2 * BATCH) == 0, (epoch, sample)
    assert step in checkpoints(run) and step >= lost_node["at_kill"][-1], (step, lost_node["at_kill"])
    assert f"step_{step}" in log, log[-5000:]  # "resumed from .../step_<n>"
    def trained(e: int) -> list[tuple[int, list[int]]]:  # (position, indices) kept in the final lineage
        before = [(pos, idx) for ep, w, pos, idx in batches if ep == e and w == 2 and (e, pos) < (epoch, sample)]
        after = [(pos, idx) for ep, w, pos, idx in batches if ep == e and w == 1]
        return sorted(before + after)

    for e in range(EPOCHS):
        seen = [i for _, idx in trained(e) for i in idx]
        assert sorted(seen) == list(range(SAMPLES)), f"epoch {e}: {len(seen)} samples, {len(set(seen))} distinct"
        # in the epoch's one global order (the same on 2 ranks and on 1): nothing skipped or repeated
        assert seen == epoch_order(SAMPLES, 0, e).tolist(), f"epoch {e}: not the global order"
    # phase 2 is one restarted worker on world size 1: no batch of it before the resume point
    assert all((e, pos) >= (epoch, sample) for e, w, pos, _ in batches if w == 1)


def lr_by_step(tb: Path, last_process: bool = False) -> dict[int, float]:
    """train/lr by optimizer step from the TensorBoard files in `tb` (with `last_process`: only
    from the newest file that has it, i.e. the last process that trained)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for f in sorted(tb.glob("events.*"), key=lambda p: float(p.name.split(".")[3])):  # by creation time
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/lr" in acc.Tags()["scalars"]:
            runs.append({e.step: e.value for e in acc.Scalars("train/lr")})
    if not runs:
        raise LookupError(f"no train/lr scalars in {tb}")
    return runs[-1] if last_process else {k: v for run in runs for k, v in run.items()}


def test_lost_agent_lr_continues_the_schedule(lost_node, reference):
    """After the resume on 1 rank (global batch 8 instead of 16), the LR at every sample count equals
    the uninterrupted 2-rank run's LR there, times 8/16 (the peak by the linear rule)."""
    assert lost_node["rc"] == 0, lost_node["log"][-5000:]
    batches = trace_batches(lost_node["trace"])
    epoch, sample = resume_point(batches)
    resumed = epoch * SAMPLES // (2 * BATCH) + sample // (2 * BATCH)  # optimizer steps at the resume
    ref = {step * 2 * BATCH: lr for step, lr in lr_by_step(reference / "tb").items()}
    # the survivor's restarted worker wrote the newest event file
    after = {(resumed * 2 * BATCH) + (step - resumed) * BATCH: lr
             for step, lr in lr_by_step(lost_node["run"] / "tb", last_process=True).items() if step > resumed}
    common = sorted(set(ref) & set(after))
    if len(common) < 10:
        raise LookupError(f"only {len(common)} common sample counts: ref {sorted(ref)[:5]}..., "
                          f"after {sorted(after)[:5]}...")
    wrong = [(s, after[s], ref[s] / 2) for s in common if abs(after[s] - ref[s] / 2) > 1e-5 * abs(ref[s]) + 1e-9]
    assert not wrong, f"{len(wrong)}/{len(common)} LRs off the curve (samples, got, expected): {wrong[:4]}"
