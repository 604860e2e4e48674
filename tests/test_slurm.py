"""SLURM bars on a real single-node cluster (slurm/cluster.sh): submitit and sbatch jobs of 2 CPU
ranks run to the end; a preempted job saves, requeues itself, resumes where it stopped and ends
with the same weights, bit for bit, as an uninterrupted torchrun run of the same config; a bad
config or a request SLURM cannot satisfy fails in slurm/submit.py with one line, nothing queued.

    .venv/bin/python -m pytest tests/test_slurm.py -q -m slurm
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_trainer
from train.export import model_state_dict

pytestmark = pytest.mark.slurm

CLUSTER = ROOT / "slurm" / "cluster.sh"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")

# ~40 ms a step at 2 CPU ranks; the run's start-up (two `import torch`, gloo) is most of a job.
# deterministic + 1 intra-op thread per rank (JOB_ENV, and run_trainer's env for the reference):
# a resumed job then ends with exactly the weights of an uninterrupted run. The thread count
# matters: 2 threads split a convolution's reductions differently from 1.
TINY = """
data: {{loader: synthetic, batch_size: 4, workers: 0, train_crop: 16, val_resize: 16, val_crop: 16,
        num_classes: 4, synthetic_samples: {samples}}}
model: {{name: resnet20, stem: cifar, sync_bn: false}}
train: {{epochs: 1, amp: "off", deterministic: true}}
log: {{dir: {runs}, every: 2, progress: lines, tensorboard: false}}
checkpoint: {{async_save: false}}
dist: {{device: cpu}}
"""


PREEMPT_STEPS = 200
JOB_ENV = {"OMP_NUM_THREADS": "1"}  # sbatch exports the submitting environment to the job


def tiny_config(tmp_path: Path, steps: int) -> Path:
    """One epoch of `steps` steps at 2 ranks x batch 4."""
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY.format(samples=steps * 8, runs=tmp_path / "runs"))
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of the preemption tests' config, run without interruption: plain torchrun
    (not SLURM), 2 ranks, OMP_NUM_THREADS=1."""
    tmp = tmp_path_factory.mktemp("reference")
    run_trainer(tiny_config(tmp, steps=PREEMPT_STEPS), "log.name=ref", nproc=2, timeout=300)
    assert summary(tmp / "runs/ref")["steps"] == PREEMPT_STEPS
    return model_state_dict(tmp / "runs/ref")


def assert_same_weights(reference: dict[str, torch.Tensor], run: Path) -> None:
    got = model_state_dict(run)
    assert got.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(reference[k], got[k])]
    assert not differ, f"{len(differ)}/{len(reference)} tensors differ from the uninterrupted run: {differ[:5]}"


@pytest.fixture(scope="session")
def cluster():
    """Start slurm/cluster.sh (installs SLURM if missing); stop it at the end if it was not running."""
    if os.geteuid() != 0:
        pytest.skip("slurm/cluster.sh needs root (it installs packages and starts munged/slurmctld/slurmd)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    was_running = subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode == 0
    r = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"the SLURM daemons could not be started:\n{r.stderr[-3000:]}")
    conf = re.search(r"export SLURM_CONF=(\S+)", r.stdout).group(1)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if not was_running:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True, timeout=300)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    t0 = time.time()
    while True:
        value = predicate()
        if value:
            return value
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def wait_done(job: str, log: Path, timeout: float = 150) -> dict[str, str]:
    try:
        return wait_for(lambda: (i := job_info(job)) and i.get("JobState") in TERMINAL and i, timeout, f"job {job}")
    except AssertionError:
        subprocess.run(["scancel", job])
        raise AssertionError(f"job {job} did not finish: {job_info(job)}\n{read(log)[-4000:]}") from None


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def logged_step(log: Path) -> int:
    steps = re.findall(r"step (\d+)/", read(log))
    return int(steps[-1]) if steps else 0


def run_submit(cfg: Path | str, *overrides: str, extra: tuple[str, ...] = (),
               env: dict | None = None) -> subprocess.CompletedProcess:
    """slurm/submit.py for 1 node x 2 CPU tasks; `extra` options come later and win."""
    cmd = [sys.executable, "slurm/submit.py", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "0",
           "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "30", "--partition", "debug", *extra,
           *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **JOB_ENV, **(env or {})})


def submit(cfg: Path, *overrides: str, extra: tuple[str, ...] = ()) -> tuple[str, str]:
    r = run_submit(cfg, *overrides, extra=extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return re.search(r"submitted job (\d+)", r.stdout).group(1), r.stdout


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))


def test_submitit_job_runs_to_completion(cluster, tmp_path):
    cfg = tiny_config(tmp_path, steps=100)
    job, out = submit(cfg, "log.name=full", "train.max_steps=12")
    run = tmp_path / "runs/full"
    log = run / "slurm" / job / f"{job}_0_log.out"
    assert f"stdout: {log}" in out and f"tensorboard --logdir {run}" in out
    info = wait_done(job, log)
    assert info["JobState"] == "COMPLETED", read(log)[-3000:]
    assert info["NumTasks"] == "2" and info["Restarts"] == "0"
    s = summary(run)
    assert s["steps"] == 12 and s["world_size"] == 2 and s["device"] == "cpu"
    assert checkpoint_steps(run)[-1] == 12
    with open(run / "slurm" / job / f"{job}_0_result.pkl", "rb") as f:  # what job.result() reads
        status, result = pickle.load(f)
    assert status == "success" and result["steps"] == 12


def test_submitit_preemption_saves_requeues_and_resumes(cluster, reference, tmp_path):
    steps = PREEMPT_STEPS
    cfg = tiny_config(tmp_path, steps=steps)
    job, _ = submit(cfg, "log.name=pre")
    run = tmp_path / "runs/pre"
    log = run / "slurm" / job / f"{job}_0_log.out"
    wait_for(lambda: logged_step(log) >= 6, 90, "training to start", poll=0.1)
    # what SLURM sends at --signal=USR2@<delay> before the time limit (and job._interrupt(timeout=True))
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    info = wait_done(job, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    saved = int(re.search(r"saved step (\d+); exiting with code 3", text).group(1))
    assert 6 <= saved < steps
    assert "Requeued job" in text and "restart 1," in text
    for task in (0, 1):  # both runs of both tasks had 1 thread, as the reference
        task_log = read(log.with_name(f"{job}_{task}_log.out"))
        assert re.findall(r"restart (\d), OMP_NUM_THREADS=1:", task_log) == ["0", "1"], task_log[-3000:]
    m = re.search(r"resumed from \S+step_(\d+): epoch 1, step (\d+)", text)
    assert m, text[-4000:]
    assert int(m.group(1)) == int(m.group(2)) == saved  # resumed at the saved step, not from scratch
    after = text[text.index("restart 1,"):]
    first_step = int(re.search(r"step (\d+)/", after).group(1))
    assert saved < first_step <= saved + 2
    assert summary(run)["steps"] == steps
    assert checkpoint_steps(run)[-1] == steps
    assert_same_weights(reference, run)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_sbatch_usr1_saves_requeues_and_resumes(cluster, reference, tmp_path):
    steps = PREEMPT_STEPS
    cfg = tiny_config(tmp_path, steps=steps)
    log = tmp_path / "sbatch.out"
    env = {**os.environ, **JOB_ENV, "CONFIG": str(cfg), "GPUS": "2", "PYTHON": sys.executable,
           "RDZV_PORT": str(free_port())}
    # the header asks for 8 GPUs and 64 CPUs: command-line options override it
    r = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}",
                        "--time=10", "slurm/train.sbatch", "log.name=sb"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    run = tmp_path / "runs/sb"
    wait_for(lambda: logged_step(log) >= 6, 90, "training to start", poll=0.1)
    subprocess.run(["scancel", "-b", "--signal=USR1", job], check=True)  # what --signal=B:USR1@120 does
    info = wait_done(job, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert "USR1: asking the training processes to save" in text
    saved = int(re.search(r"\[rank0\] saved step (\d+); exiting with code 3", text).group(1))
    assert 6 <= saved < steps
    assert "all 2 workers saved a checkpoint" in text and "requeueing job" in text
    assert "restart 1:" in text
    assert len(re.findall(r"restart \d: 1 node\(s\) x 2 workers, OMP_NUM_THREADS=1,", text)) == 2, text[-4000:]
    m = re.search(r"resumed from \S+step_(\d+): epoch 1, step (\d+)", text)
    assert m and int(m.group(1)) == int(m.group(2)) == saved, text[-4000:]
    after = text[text.index("restart 1:"):]
    assert saved < int(re.search(r"step (\d+)/", after).group(1)) <= saved + 2
    assert summary(run)["steps"] == steps and summary(run)["world_size"] == 2
    assert "training exited with code 0" in text
    assert_same_weights(reference, run)


def test_dry_run_prints_the_sbatch_parameters(tmp_path):
    """Needs no cluster: the batch script comes from submitit's own generator."""
    cmd = [sys.executable, "slurm/submit.py", "--config", "configs/imagenet_resnet50.yaml", "--nodes", "2",
           "--gpus-per-node", "8", "--partition", "gpu", "--time", "72:00:00", "--cpus-per-task", "10",
           "--mem-per-gpu", "64G", "--account", "acct", "--qos", "high", "--constraint", "h100", "--exclusive",
           "--job-name", "rn50", "--dry-run", "data.root=/data/imagenet", f"log.dir={tmp_path}/runs"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # the data lives on the cluster's file system: not visible here is a warning, not an error
    assert "warning: data.root '/data/imagenet' is not visible on this machine" in r.stderr
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=4320", "#SBATCH --cpus-per-task=10",
                 "#SBATCH --mem-per-gpu=64G", "#SBATCH --account=acct", "#SBATCH --qos=high",
                 "#SBATCH --constraint=h100", "#SBATCH --exclusive", "#SBATCH --job-name=rn50",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=USR2@120",
                 f"#SBATCH --output={tmp_path}/runs/imagenet_resnet50/slurm/%j/%j_0_log.out"]:
        assert line in out, f"{line!r} not in:\n{out}"
    assert "submitit.core._submit" in out and "train.resume=auto" in out and "data.root=/data/imagenet" in out
    assert not (tmp_path / "runs").exists()  # nothing submitted, nothing written
    # CPU cluster: no GPU request, tasks from --tasks-per-node
    r = subprocess.run([*cmd[:7], "0", *cmd[8:], "--tasks-per-node", "4"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --ntasks-per-node=4" in r.stdout and "gpus-per-node" not in r.stdout
    # a machine without SLURM (no srun on PATH): the same script
    no_slurm = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**env, "PATH": str(Path(sys.executable).parent)})
    assert no_slurm.returncode == 0 and no_slurm.stdout == out, no_slurm.stderr


def test_local_executor_runs_two_tasks(tmp_path):
    """--local: submitit's local executor (no SLURM), the same Trainer callable, 2 CPU tasks."""
    cfg = tiny_config(tmp_path, steps=100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, "slurm/submit.py", "--local", "--config", str(cfg), "--gpus-per-node", "0",
                        "--tasks-per-node", "2", "--time", "10", "log.name=loc", "train.max_steps=6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "done: 6 steps" in r.stdout
    s = summary(tmp_path / "runs/loc")
    assert s["steps"] == 6 and s["world_size"] == 2


def fake_sbatch(tmp_path: Path, reject: str = "") -> tuple[dict, Path]:
    """PATH with an `sbatch` that logs its calls; it accepts `--test-only` and, with `reject`,
    refuses the real submission with that message (as sbatch does: on stderr, exit 1)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch_calls"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "sbatch").write_text(f"""#!/bin/sh
echo "$*" >> {calls}
case " $* " in *" --test-only "*) echo "sbatch: Job 1 to start at now" >&2; exit 0;; esac
echo "sbatch: error: Batch job submission failed: {reject}" >&2
exit 1
""")
    (bin_dir / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}"}, calls


def assert_one_error_line(r: subprocess.CompletedProcess, *expected: str) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert "submitted job" not in r.stdout
    return lines[0]


@pytest.mark.parametrize("config, overrides, expected", [
    ("tiny", ["optim.lr=abc"], "error: config: optim.lr: expected float, got 'abc'"),
    ("tiny", ["optim.lrr=0.1"], "error: config: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("tiny", ["train.epochs=0"], "error: config: train.epochs: must be > 0"),
    ("configs/imagenet_resnet50.yaml", [], "error: config: data.root: not set"),
    ("configs/imagenet_resnet50.yaml", ["--check-data", "data.root=/nonexistent/imagenet"],
     "error: config: data.root: '/nonexistent/imagenet/train' does not exist"),
], ids=["wrong-type", "unknown-key", "invalid-value", "no-data-root", "check-data"])
def test_bad_config_fails_at_submission(tmp_path, config, overrides, expected):
    """Needs no cluster: the config is checked before SLURM is asked anything."""
    env, calls = fake_sbatch(tmp_path)
    cfg = tiny_config(tmp_path, steps=10) if config == "tiny" else config
    r = run_submit(cfg, f"log.dir={tmp_path}/runs", *overrides, env=env)
    assert_one_error_line(r, expected)
    assert not calls.exists()  # sbatch never called: nothing queued
    assert not (tmp_path / "runs").exists()


def test_sbatch_rejection_is_one_line(tmp_path):
    """Needs no cluster: a request that passes `sbatch --test-only` but that sbatch refuses (the
    path where submitit raises FailedJobError) gives the same one line, and leaves no files."""
    env, calls = fake_sbatch(tmp_path, reject="Invalid account or account/partition combination specified")
    r = run_submit(tiny_config(tmp_path, steps=10), "log.name=acct", env=env)
    assert_one_error_line(r, "error: SLURM rejected the job (partition 'debug', 1 node(s) x 2 task(s), "
                             "1 CPU(s)/task, time 30): Invalid account or account/partition combination specified")
    checked, submitted = calls.read_text().splitlines()  # `sbatch --test-only`, then submitit's `sbatch <script>`
    assert checked == "--test-only" and submitted.endswith(".sh")
    assert not (tmp_path / "runs").exists()  # submitit's pickle and script removed


@pytest.mark.parametrize("extra, expected", [
    (("--partition", "nosuch"), "Invalid partition name specified"),
    (("--nodes", "5"), "Requested node configuration is not available"),  # a plain sbatch would queue it
    (("--cpus-per-task", "64"), "Requested node configuration is not available"),
], ids=["partition", "nodes", "cpus"])
def test_impossible_request_fails_at_submission(cluster, tmp_path, extra, expected):
    """`sbatch --test-only` on the real controller: one line with SLURM's reason, exit 2, no job."""
    name = f"bad-{extra[0].strip('-')}-{os.getpid()}"
    r = run_submit(tiny_config(tmp_path, steps=10), extra=(*extra, "--job-name", name))
    line = assert_one_error_line(r, "error: SLURM rejected the job (", f"): {expected}")
    assert "Traceback" not in r.stderr, line
    queued = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"], capture_output=True, text=True)
    assert queued.returncode == 0 and queued.stdout.strip() == "", queued.stdout + queued.stderr
    assert not (tmp_path / "runs").exists()
