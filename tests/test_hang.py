"""Hangs and stragglers (train/watchdog.py, docs/reliability.md "Hangs and stragglers").

  * A rank stopped with SIGSTOP under `torchrun --max-restarts=1` (2 gloo ranks): the other rank
    names it and its host in one line within dist.hang_timeout_s + 10 s of the stop, writes its
    stacks and every rank's last step to <run>/hang/, exits 75; torchrun restarts the round, which
    resumes from the newest checkpoint and ends with the weights of an uninterrupted run, bit for
    bit. The uninterrupted run logs each rank's busy time per step to TensorBoard.
  * The decisions as pure functions with injected heartbeats and timings: who is stalled, the
    line, who is a straggler; BusyTimer counts data wait and forward, not the all-reduce wait.
  * NCCL's flight-recorder variables are set for nccl (the user's values win), never for gloo.

    .venv/bin/python -m pytest -q tests/test_hang.py
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, make_image_folder, write_config
from tests.distributed_helpers import free_port
from train import config as config_lib
from train import distributed
from train.checkpoint import complete
from train.export import model_state_dict
from train.watchdog import (
    HANG_EXIT_CODE,
    Beat,
    BusyTimer,
    DeadlineStore,
    StoreSilent,
    StragglerDetector,
    claim_hang_requeue,
    hang_message,
    stalled_ranks,
    stragglers,
)

# -- who is stalled ---------------------------------------------------------------------------------


def beat(step: int, t: float, host: str = "h", done: bool = False) -> Beat:
    return Beat(step=step, time=t, host=host, pid=100, where="train/trainer.py:1 train_epoch", done=done)


def test_a_stale_heartbeat_names_that_rank():
    beats = {0: beat(12, 100.0, "a"), 1: beat(12, 85.0, "b"), 2: beat(12, 99.5, "c")}
    assert stalled_ranks(beats, now=100.5, timeout=10) == ([1], "stale")
    assert stalled_ranks(beats, now=94.0, timeout=10) == ([], "")  # 9 s: not yet


def test_alive_ranks_behind_the_others_are_named():
    beats = {0: beat(13, 100.0), 1: beat(12, 100.0), 2: beat(13, 100.0)}
    assert stalled_ranks(beats, now=100.5, timeout=10) == ([1], "behind")


def test_all_alive_at_one_step_is_left_to_the_collective_timeout():
    beats = {0: beat(12, 100.0), 1: beat(12, 99.0)}
    assert stalled_ranks(beats, now=100.5, timeout=10) == ([], "")


def test_ranks_that_left_training_are_not_stalled_and_a_missing_heartbeat_is():
    beats = {0: beat(12, 100.0), 1: beat(16, 50.0, done=True), 2: None}
    assert stalled_ranks(beats, now=100.5, timeout=10) == ([2], "stale")


def test_the_hang_line_names_rank_host_and_step():
    beats = {0: beat(12, 100.0, "node-a"), 1: beat(11, 88.0, "node-b")}
    line = hang_message([1], "stale", beats, now=100.0, timeout=10, hang_dir=Path("runs/x/hang"))
    assert "\n" not in line
    assert line == ("hang: rank 1 on node-b (pid 100) sent no heartbeat for 12 s (dist.hang_timeout_s=10), the last "
                    "at step 11 in train/trainer.py:1 train_epoch; the other ranks' stacks and every rank's last "
                    f"step are in runs/x/hang; exiting with code {HANG_EXIT_CODE} for a restart")
    beats[2] = beat(9, 99.0, "node-c")
    line = hang_message([1, 2], "behind", beats, now=100.0, timeout=10, hang_dir=Path("h"))
    assert line.startswith("hang: rank 1 on node-b (pid 100), rank 2 on node-c (pid 100) stuck at step 11 in "
                           "train/trainer.py:1 train_epoch; step 9 in train/trainer.py:1 train_epoch for 10 s "
                           "(dist.hang_timeout_s) while the others reached step 12; "), line
    line = hang_message([0], "store", {}, now=100.0, timeout=12.4, hang_dir=Path("h"), store_host="10.0.0.1")
    assert line == ("hang: rank 0 on 10.0.0.1 does not answer for 12 s (dist.hang_timeout_s): its process serves the "
                    f"rendezvous store; the other ranks' stacks are in h; exiting with code {HANG_EXIT_CODE} for a "
                    "restart")


def test_a_stopped_store_server_costs_the_watchdog_one_timeout_not_forever():
    """TCPStore's check() waits for a reply without a deadline; with the server (rank 0 under srun or
    Submitit) stopped it never returns. DeadlineStore gives up after its timeout, then at once."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "import datetime, time, torch.distributed as d; "
                               f"s = d.TCPStore('127.0.0.1', {port}, None, True, datetime.timedelta(seconds=60), "
                               "wait_for_workers=False); time.sleep(120)"])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client = torch.distributed.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=2),
                                                    wait_for_workers=False)
                break
            except torch.distributed.DistError:
                assert time.monotonic() < deadline
        store = DeadlineStore(client, timeout=1.0)
        store.set("up", "1")
        assert store.check(["up"]) is True
        os.kill(server.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(StoreSilent, match="check got no answer in 1 s"):
            store.check(["up"])
        with pytest.raises(StoreSilent, match="a get is still waiting"):
            store.get("up")
        assert time.monotonic() - t0 < 3  # 1 s and a thread's start, under load
    finally:
        server.kill()
        server.wait()


# -- requeue on a hang under Submitit ---------------------------------------------------------------


def test_a_hang_requeues_only_under_submitit_and_at_most_max_hang_requeues_times(tmp_path):
    """RESNET_REQUEUE_ON_HANG=1 (slurm/submit.py's tasks) and a SLURM job: one claim per restart
    round (the rank that wins creates requeue.<job>.<round>), MAX_HANG_REQUEUES per job (default 3)."""
    on = {"RESNET_REQUEUE_ON_HANG": "1", "SLURM_JOB_ID": "77"}
    assert claim_hang_requeue({"SLURM_JOB_ID": "77"}, tmp_path) == ("", "")  # torchrun, train.sbatch
    assert claim_hang_requeue({**on, "RESNET_REQUEUE_ON_HANG": "0"}, tmp_path) == ("", "")
    assert claim_hang_requeue({"RESNET_REQUEUE_ON_HANG": "1"}, tmp_path) == ("", "")  # not under SLURM
    assert list(tmp_path.iterdir()) == []
    for n in (1, 2, 3):
        env = {**on, "SLURM_RESTART_COUNT": str(n - 1)} if n > 1 else on  # unset in the first run
        assert claim_hang_requeue(env, tmp_path) == (
            "77", f"requeue: requeueing job 77 after the hang ({n} of MAX_HANG_REQUEUES=3); it resumes from the newest "
                  "checkpoint")
        assert claim_hang_requeue(env, tmp_path) == ("", "")  # a second rank of the same round
    assert sorted(p.name for p in tmp_path.iterdir()) == ["requeue.77.0", "requeue.77.1", "requeue.77.2"]
    assert claim_hang_requeue({**on, "SLURM_RESTART_COUNT": "3"}, tmp_path) == (
        "", "requeue: not requeueing job 77: it was requeued for a hang 3 time(s) already (MAX_HANG_REQUEUES=3)")
    assert claim_hang_requeue({**on, "SLURM_RESTART_COUNT": "3", "MAX_HANG_REQUEUES": "4"}, tmp_path)[0] == "77"
    other = {**on, "SLURM_JOB_ID": "78"}  # another job in the same run dir starts at 0
    assert claim_hang_requeue({**other, "MAX_HANG_REQUEUES": "0"}, tmp_path) == (
        "", "requeue: not requeueing job 78: it was requeued for a hang 0 time(s) already (MAX_HANG_REQUEUES=0)")
    assert claim_hang_requeue({**other, "MAX_HANG_REQUEUES": "x"}, tmp_path) == (
        "", "requeue: not requeueing job 78: MAX_HANG_REQUEUES='x' is not a whole number")
    assert claim_hang_requeue(other, tmp_path)[0] == "78"


HANG = """
import logging, sys
from pathlib import Path
from types import SimpleNamespace
import torch.distributed as dist
from train import watchdog
watchdog.HEARTBEAT_S = 0.01
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
dog = watchdog.Watchdog.__new__(watchdog.Watchdog)
dog.rank, dog.host, dog.pid, dog.backend, dog.state = 0, "h", 1, "gloo", SimpleNamespace(step=7)
dog.hang_dir, dog.store = Path(sys.argv[1]), dist.HashStore()
dog._hang("hang: rank 1 named", {})
"""


@pytest.mark.parametrize("env, calls, note", [
    ({}, [], ""),
    ({"RESNET_REQUEUE_ON_HANG": "1"}, ["requeue 4242"],
     "requeue: requeueing job 4242 after the hang (1 of MAX_HANG_REQUEUES=3); it resumes from the newest checkpoint"),
    ({"RESNET_REQUEUE_ON_HANG": "1", "MAX_HANG_REQUEUES": "0"}, [],
     "requeue: not requeueing job 4242: it was requeued for a hang 0 time(s) already (MAX_HANG_REQUEUES=0)"),
    ({"RESNET_REQUEUE_ON_HANG": "1", "SCONTROL_RC": "1"}, ["requeue 4242"],
     "requeue: `scontrol requeue 4242` failed: scontrol: error: Invalid job id specified"),
], ids=["torchrun", "submitit", "bound", "scontrol-fails"])
def test_the_rank_naming_a_hang_requeues_the_slurm_job_then_exits_75(tmp_path, env, calls, note):
    """Watchdog._hang in a process of its own, with a fake `scontrol` on PATH that records its
    arguments: it exits 75 in every case, and calls `scontrol requeue <job>` only when asked to."""
    bin_dir, record = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"""#!/bin/sh
echo "$*" >> {record}
[ "${{SCONTROL_RC:-0}}" = 0 ] || echo "scontrol: error: Invalid job id specified" >&2
exit "${{SCONTROL_RC:-0}}"
""")
    (bin_dir / "scontrol").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RESNET_", "MAX_HANG"))}
    r = subprocess.run([sys.executable, "-c", HANG, str(tmp_path / "hang")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**base, "PATH": f"{bin_dir}:{base['PATH']}", "SLURM_JOB_ID": "4242", **env})
    assert r.returncode == HANG_EXIT_CODE, r.stdout + r.stderr
    assert r.stdout.splitlines() == ["hang: rank 1 named", *([note] if note else [])], r.stdout + r.stderr
    assert (record.read_text().splitlines() if record.exists() else []) == calls
    markers = sorted(p.name for p in (tmp_path / "hang").glob("requeue.*"))
    assert markers == (["requeue.4242.0"] if calls else [])
    assert (tmp_path / "hang/rank0.txt").read_text().startswith("== ")


# -- stragglers ------------------------------------------------------------------------------------


def test_a_rank_slower_than_the_others_median_in_every_window_is_a_straggler():
    fast = {0: 0.100, 1: 0.104, 3: 0.098}
    windows = [{**fast, 2: 0.150}] * 5
    assert stragglers(windows, ratio=1.2) == {2}
    assert stragglers([*windows[:4], {**fast, 2: 0.110}], ratio=1.2) == set()  # one window in line: not persistent
    assert stragglers(windows, ratio=1.6) == set()


def test_two_ranks_compare_with_each_other():
    """With two ranks the median of both (0.125) would need 1.5x to exceed 1.2x; the other's does not."""
    assert stragglers([{0: 0.100, 1: 0.130}] * 5, ratio=1.2) == {1}
    assert stragglers([{0: 0.100, 1: 0.115}] * 5, ratio=1.2) == set()


def test_the_detector_needs_five_windows_in_a_row_and_reports_once():
    d = StragglerDetector(ratio=1.2)
    slow, even = {0: 0.1, 1: 0.1, 2: 0.2}, {0: 0.1, 1: 0.1, 2: 0.1}
    got = [d.update(w) for w in [slow, slow, even, slow, slow, slow, slow, slow, slow, slow]]
    assert got == [[], [], [], [], [], [], [], [2], [], []]


def test_busy_timer_counts_data_wait_and_forward_but_not_the_allreduce_wait():
    """A DDP stand-in: 30 ms waiting for data and 20 ms of forward are busy; the 60 ms after the
    forward (backward with the all-reduce wait, optimizer) and evaluation forwards are not."""
    class Inner(torch.nn.Linear):
        def forward(self, x):
            time.sleep(0.02)
            return super().forward(x)

    bare = Inner(4, 2)
    outer = torch.nn.Sequential(bare)  # the wrapper whose forward DDP's buffer broadcast would be in
    opt = torch.optim.SGD(outer.parameters(), lr=0.1)
    timer = BusyTimer(outer, bare, opt)
    steps = 4
    for _ in range(steps):
        time.sleep(0.03)  # data
        outer(torch.randn(2, 4)).sum().backward()
        time.sleep(0.06)  # the all-reduce wait
        opt.step()
    outer.eval()
    outer(torch.randn(2, 4))
    busy, n = timer.value
    assert n == steps
    # the first step's data wait precedes any step end and is not counted: 3 x 30 + 4 x 20 ms
    assert 0.17 <= busy < 0.17 + 0.05, busy
    timer.remove()
    assert not bare._forward_hooks and not outer._forward_pre_hooks


# -- config and NCCL environment -----------------------------------------------------------------

NCCL_NAMES = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_FR_DUMP_TEMP_FILE",
              "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


def test_nccl_flight_recorder_env_for_nccl_only_and_the_users_values_win(tmp_path):
    assert distributed.nccl_debug_env("gloo", tmp_path, environ={}) == {}
    assert distributed.nccl_debug_env("nccl", tmp_path, environ={}) == {
        "TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "hang" / "nccl_trace_rank_"), "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    user = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "100", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_",
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert distributed.nccl_debug_env("nccl", tmp_path, environ=user) == {}
    torchrun = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCHELASTIC_RUN_ID": "x"}  # torchrun's default
    assert distributed.nccl_debug_env("nccl", tmp_path, environ=torchrun)["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


@pytest.mark.parametrize("backend, expected", [("gloo", False), ("nccl", True)])
def test_init_sets_the_nccl_env_before_the_group(tmp_path, monkeypatch, backend, expected):
    """A world of one: init() reaches the env step and creates no group, so nccl needs no GPU here."""
    drop = (*NCCL_NAMES, "RANK", "WORLD_SIZE", "SLURM_PROCID", "TORCHELASTIC_RUN_ID")
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in drop})
    distributed.init(config_lib.DistConfig(backend=backend, device="cpu"), tmp_path / "run")
    got = {n: os.environ[n] for n in NCCL_NAMES if n in os.environ}
    if expected:
        assert got == {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                       "TORCH_FR_DUMP_TEMP_FILE": str(tmp_path / "run/hang/nccl_trace_rank_"),
                       "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
        assert (tmp_path / "run/hang").is_dir()
    else:
        assert got == {} and not (tmp_path / "run").exists()


def test_hang_timeout_must_be_below_the_training_collective_timeout():
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.load(None, ["dist.hang_timeout_s=100"], check_data=False)
    assert str(e.value) == ("dist.hang_timeout_s: must be below the training collective timeout (100 s: "
                            "dist.train_timeout_s, at most dist.timeout_s), or that timeout ends the run before the "
                            "hung rank is named; got 100")
    config_lib.load(None, ["dist.hang_timeout_s=0", "dist.train_timeout_s=0"], check_data=False)  # both off


# -- a SIGSTOPped rank, end to end ---------------------------------------------------------------

PER_CLASS, CLASSES, EPOCHS, HANG_S = 64, 4, 3, 10  # 16 steps/epoch on 2 ranks x batch 8
COMMON = ("dist.device=cpu", "dist.cpu_threads=1", f"train.epochs={EPOCHS}", "checkpoint.every_steps=5",
          "checkpoint.keep=100", f"dist.hang_timeout_s={HANG_S}", "dist.train_timeout_s=60", "log.tensorboard=true")
LINE = re.compile(r"hang: rank 1 on (\S+) \(pid (\d+)\) sent no heartbeat for \d+ s .*?, the last at step (\d+)")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    data = make_image_folder(tmp_path_factory.mktemp("hang-data"), classes=CLASSES, train_per_class=PER_CLASS, val=16)
    return write_config(tmp_path_factory.mktemp("hang"), data)


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if complete(p))


def worker(torchrun: int, rank: int) -> int:
    """The pid of the worker of `rank` under the torchrun process `torchrun` (RANK in its environment)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        pid = int(environ.parent.name)
        try:
            env, cmd = environ.read_bytes().split(b"\0"), (environ.parent / "cmdline").read_bytes()
            if (b"train/main.py" in cmd and b"torch.distributed.run" not in cmd and f"RANK={rank}".encode() in env
                    and descends(pid, torchrun)):
                return pid
        except OSError:  # gone meanwhile
            continue
    raise LookupError(f"no worker of rank {rank} under pid {torchrun}")


def descends(pid: int, ancestor: int) -> bool:
    while pid > 1 and pid != ancestor:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return pid == ancestor


def torchrun(config: Path, log: Path, *overrides: str, max_restarts: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", "train/main.py", "--config", str(config),
           *COMMON, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_stopped_rank_is_named_in_time_and_the_restart_ends_bitwise(config):
    """The uninterrupted reference trains beside it (the detection is timed by the wall clock)."""
    run, log_path = config.parent / "runs/hang", config.parent / "hang.log"
    reference = torchrun(config, config.parent / "ref.log", "log.name=ref")
    proc = torchrun(config, log_path, "log.name=hang", max_restarts=1)
    stopped = None
    try:
        t0 = time.monotonic()
        while not checkpoints(run) or checkpoints(run)[-1] < 10:  # mid-epoch, after the timeout switch
            assert proc.poll() is None and time.monotonic() - t0 < 300, log_path.read_text()[-5000:]
            time.sleep(0.02)
        stopped = worker(proc.pid, rank=1)
        os.kill(stopped, signal.SIGSTOP)
        t_stop = time.monotonic()
        while not (m := LINE.search(log_path.read_text(errors="replace"))):
            assert time.monotonic() - t_stop < HANG_S + 30, log_path.read_text()[-5000:]
            time.sleep(0.1)
        detected = time.monotonic() - t_stop
        rc = proc.wait(timeout=300)
        assert reference.wait(timeout=300) == 0, (config.parent / "ref.log").read_text()[-5000:]
    finally:
        for p in (proc, reference):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log_path.read_text(errors="replace")
    assert rc == 0, text[-5000:]
    assert "hang:" not in (config.parent / "ref.log").read_text()
    host, pid, step = m.group(1), int(m.group(2)), int(m.group(3))
    assert (host, pid) == (socket.gethostname(), stopped)
    assert detected <= HANG_S + 10, f"named {detected:.1f} s after the stop"
    lines = [ln for ln in text.splitlines() if "hang: " in ln]
    assert len(lines) == 1 and lines[0].endswith(f"exiting with code {HANG_EXIT_CODE} for a restart"), lines
    assert f"(exitcode: {HANG_EXIT_CODE}) local_rank: 0" in text  # torchrun's report of the survivor's exit
    assert "collective timeout 1800 s -> 60 s after 2 steps" in text
    # the survivor's stacks and the table of last steps; the stopped rank could not write
    files = sorted(p.name for p in (run / "hang").iterdir())
    assert files == ["rank0.txt"], files
    dump = (run / "hang/rank0.txt").read_text()
    assert re.search(rf"^1  {re.escape(host)}  {pid}  {step}  \d+\.\d  False  ", dump, re.M), dump[:2000]
    assert "Python stacks of this rank's threads:" in dump and 'File "' in dump and "train_epoch" in dump
    # the restart resumed and ended where an uninterrupted run ends, bit for bit
    assert "resumed from" in text
    ref, got = model_state_dict(config.parent / "runs/ref"), model_state_dict(run)
    assert ref.keys() == got.keys()
    differ = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differ, f"{len(differ)}/{len(ref)} tensors differ: {differ[:5]}"
    # each rank's busy time per step reached TensorBoard (rank 0 reads it from the heartbeats)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for f in (config.parent / "runs/ref/tb").glob("events.*"):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"rank_busy_ms/rank0", "rank_busy_ms/rank1"} <= tags, sorted(tags)


# -- a slow rank, end to end ---------------------------------------------------------------------

SLOW = """
data: {{loader: synthetic, batch_size: 8, workers: 0, train_crop: 16, val_resize: 16, val_crop: 16, num_classes: 4,
        synthetic_samples: 8000}}
model: {{name: resnet20, stem: cifar}}
train: {{epochs: 1, max_steps: 100, amp: "off"}}
log: {{dir: {runs}, every: 5, progress: lines, tensorboard: false}}
checkpoint: {{async_save: false}}
dist: {{device: cpu, cpu_threads: 1}}
"""


def test_a_rank_with_a_slow_input_pipeline_is_named_once(tmp_path):
    """Rank 1 gets every batch 200 ms late (tests/slow_rank.py): both ranks step at its pace, but
    only rank 1 is busy before the all-reduce; after 5 windows of 3 s it is named, once."""
    config = tmp_path / "slow.yaml"
    config.write_text(SLOW.format(runs=tmp_path / "runs"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "SLOW_RANK": "1", "SLOW_S": "0.2"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "tests/slow_rank.py", "--config", str(config)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if "straggler:" in ln]
    assert len(lines) == 1, lines
    m = re.search(r"straggler: rank 1 on (\S+) is busy (\d+) ms per step before the all-reduce \(data wait \+ "
                  r"forward\), ([\d.]+)x the median of the other ranks \((\d+) ms\), for 5 windows of 3 s in a "
                  r"row; every rank waits for it$", lines[0])
    assert m and m.group(1) == socket.gethostname(), lines[0]
    assert int(m.group(2)) >= 200 and float(m.group(3)) > 1.2, lines[0]
