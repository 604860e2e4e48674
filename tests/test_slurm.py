"""SLURM bars on a real cluster of two nodes on this one machine (slurm/cluster.sh: n1 and n2, both
127.0.0.1): submitit and sbatch jobs of 2 CPU ranks run to the end, on one node or one rank per
node; a preempted job saves, requeues itself, resumes where it stopped and ends with the same
weights as an uninterrupted single-node torchrun run of the same config (bit for bit on one
node, allclose on two); each local rank is bound to its own share of the node's CPUs; a sweep is
a job array with one run dir per point, each point requeued on its own; a bad config or a
request SLURM cannot satisfy fails in slurm/submit.py with one line, nothing queued.

    .venv/bin/python -m pytest tests/test_slurm.py -q -m slurm
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm import binding
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


def assert_same_weights(reference: dict[str, torch.Tensor], run: Path, exact: bool = True) -> None:
    got = model_state_dict(run)
    assert got.keys() == reference.keys()
    same = torch.equal if exact else (lambda a, b: torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6))
    differ = [k for k in reference if not same(reference[k], got[k])]
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
    # --numa-binding node (the default) on a CPU-only node: each task its own share of the CPUs
    shares = [submit_cpus(read(log.with_name(f"{job}_{task}_log.out"))) for task in (0, 1)]
    assert all(shares) and not shares[0] & shares[1], shares
    assert shares[0] | shares[1] == os.sched_getaffinity(0), shares


def submit_cpus(task_log: str) -> set[int]:
    """The CPUs a submitit task ran on, from its '[submit] ... CPUs 0 (bound)' line ({} if not bound)."""
    m = re.search(r"CPUs (\S+) \(bound\)", task_log)
    return binding.parse_cpu_list(m.group(1)) if m else set()


def preempt_submitit(tmp_path, name: str, *overrides: str, extra=(), start_timeout: float = 90):
    """Submit the tiny config, send USR2 once it trains (what SLURM sends at --signal=USR2@<delay>
    before the time limit), wait for the requeued job to finish; (job, run dir, task-0 log path,
    its text, job info, the step saved on the signal)."""
    cfg = tiny_config(tmp_path, steps=PREEMPT_STEPS)
    job, _ = submit(cfg, f"log.name={name}", *overrides, extra=extra)
    run = tmp_path / "runs" / name
    log = run / "slurm" / job / f"{job}_0_log.out"
    wait_for(lambda: logged_step(log) >= 6, start_timeout, "training to start", poll=0.1)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    info = wait_done(job, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    saved = int(re.search(r"saved step (\d+); exiting with code 3", text).group(1))
    assert 6 <= saved < PREEMPT_STEPS
    return job, run, log, text, info, saved


def test_submitit_preemption_saves_requeues_and_resumes(cluster, reference, tmp_path):
    steps = PREEMPT_STEPS
    job, run, log, text, info, saved = preempt_submitit(tmp_path, "pre")
    assert "Requeued job" in text and "restart 1," in text
    for task in (0, 1):  # both runs of both tasks had 1 thread, as the reference
        task_log = read(log.with_name(f"{job}_{task}_log.out"))
        assert re.findall(r"restart (\d), OMP_NUM_THREADS=1,", task_log) == ["0", "1"], task_log[-3000:]
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
    # no GPU: each worker of each run bound to its own share of the node's CPUs (slurm/binding.py)
    for restart in text.split("restart 1:"):
        shares = sbatch_cpus(restart)
        assert set(shares) == {("n1", 0), ("n1", 1)}, shares
        assert not shares["n1", 0] & shares["n1", 1] and shares["n1", 0] | shares["n1", 1] == os.sched_getaffinity(0)


def sbatch_cpus(text: str) -> dict[tuple[str, int], set[int]]:
    """(node, local rank) -> CPUs, from slurm/binding.py's '[binding] n1 local rank 0/2: CPUs 0 of 0-1'."""
    return {(node, int(rank)): binding.parse_cpu_list(cpus)
            for node, rank, cpus in re.findall(r"\[binding\] (\S+) local rank (\d+)/\d+: CPUs (\S+) of", text)}


def test_sbatch_two_nodes_usr1_requeues_and_matches_one_node(cluster, reference, tmp_path):
    """`sbatch --nodes=2`: one torchrun per node (n1, n2: both 127.0.0.1), one worker each, a c10d
    rendezvous at n1's NodeAddr; preempted, requeued, resumed: the weights of the uninterrupted
    single-node 2-rank run."""
    steps = PREEMPT_STEPS
    cfg = tiny_config(tmp_path, steps=steps)
    log = tmp_path / "sbatch2.out"
    env = {**os.environ, **JOB_ENV, "CONFIG": str(cfg), "GPUS": "1", "PYTHON": sys.executable,
           "RDZV_PORT": str(free_port())}
    r = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
                        "--cpus-per-task=1", f"--output={log}", "--time=10", "slurm/train.sbatch", "log.name=sb2",
                        "dist.cpu_threads=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    run = tmp_path / "runs/sb2"
    wait_for(lambda: logged_step(log) >= 6, 120, "training to start", poll=0.1)
    subprocess.run(["scancel", "-b", "--signal=USR1", job], check=True)
    info = wait_done(job, log)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["NumNodes"] == "2", text[-4000:]
    header = r"restart \d: 2 node\(s\) x 1 workers, OMP_NUM_THREADS=1, rendezvous 127\.0\.0\.1:"
    assert len(re.findall(header, text)) == 2, text[-4000:]  # n1's NodeAddr: "n1" itself does not resolve
    saved = int(re.search(r"\[rank0\] saved step (\d+); exiting with code 3", text).group(1))
    assert 6 <= saved < steps
    assert len(re.findall(r"all 1 workers saved a checkpoint and exited with code 3", text)) == 2, text[-4000:]
    for run_text in text.split("restart 1:"):  # one worker per node, each on its node's CPUs
        assert set(sbatch_cpus(run_text)) == {("n1", 0), ("n2", 0)}, run_text[-3000:]
    m = re.search(r"resumed from \S+step_(\d+): epoch 1, step (\d+)", text)
    assert m and int(m.group(1)) == int(m.group(2)) == saved, text[-4000:]
    assert summary(run)["steps"] == steps and summary(run)["world_size"] == 2
    assert "training exited with code 0" in text
    assert_same_weights(reference, run, exact=False)


def test_submitit_two_nodes_preemption_matches_one_node(cluster, reference, tmp_path):
    """`submit.py --nodes 2 --tasks-per-node 1`: one task per node, MASTER_ADDR is n1's NodeAddr
    (n1 does not resolve); USR2, save, requeue, resume: the single-node run's weights."""
    steps = PREEMPT_STEPS
    job, run, log, text, info, saved = preempt_submitit(
        tmp_path, "pre2", "dist.cpu_threads=1", extra=("--nodes", "2", "--tasks-per-node", "1"), start_timeout=120)
    assert info["NumNodes"] == "2" and info["NumTasks"] == "2"
    for task in (0, 1):
        task_log = read(log.with_name(f"{job}_{task}_log.out"))
        assert len(re.findall(rf"node={task}\(2\), global_rank={task}\(2\)\) restart \d, OMP_NUM_THREADS=1, "
                              r"MASTER_ADDR=127\.0\.0\.1,", task_log)) == 2, task_log[-3000:]
    assert "Requeued job" in text
    m = re.search(r"resumed from \S+step_(\d+): epoch 1, step (\d+)", text)
    assert m and int(m.group(1)) == int(m.group(2)) == saved, text[-4000:]
    assert summary(run)["steps"] == steps and summary(run)["world_size"] == 2
    assert_same_weights(reference, run, exact=False)


def test_sweep_is_a_job_array_with_a_run_dir_per_point(cluster, tmp_path):
    """Two points of `--sweep optim.lr=0.05,0.2 --sweep train.seed=3`: one array job, both tasks
    run to the end in their own run dirs with their own resolved config; the first is preempted
    and requeued on its own (the other is not restarted)."""
    import yaml

    cfg = tiny_config(tmp_path, steps=200)  # 1 rank x batch 4: 400 steps/epoch; max_steps ends it
    r = run_submit(cfg, "log.name=sw", "train.max_steps=100", "dist.cpu_threads=1",
                   extra=("--tasks-per-node", "1", "--sweep", "optim.lr=0.05,0.2", "--sweep", "train.seed=3",
                          "--array-parallelism", "2"))
    assert r.returncode == 0, r.stdout + r.stderr
    array = re.search(r"submitted array job (\d+) \(slurm, 2 points\)", r.stdout).group(1)
    names = ["sw-lr0.05-seed3", "sw-lr0.2-seed3"]
    sweep = tmp_path / "runs/sw-sweep"
    logs = [sweep / f"{array}_{i}" / f"{array}_{i}_0_log.out" for i in (0, 1)]
    for i, name in enumerate(names):
        assert f"{array}_{i}: {tmp_path / 'runs' / name}" in r.stdout, r.stdout
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    assert [(p["job"], Path(p["run_dir"]).name, p["overrides"]) for p in points] == [
        (f"{array}_0", names[0], ["optim.lr=0.05", "train.seed=3"]),
        (f"{array}_1", names[1], ["optim.lr=0.2", "train.seed=3"])]
    wait_for(lambda: logged_step(logs[0]) >= 6, 120, "point 0 to start", poll=0.1)
    subprocess.run(["scancel", "--signal=USR2", f"{array}_0"], check=True)
    infos = [wait_done(f"{array}_{i}", logs[i], timeout=400) for i in (0, 1)]
    for i, (name, info) in enumerate(zip(names, infos, strict=True)):
        assert info["JobState"] == "COMPLETED", read(logs[i])[-3000:]
        assert info["ArrayJobId"] == array and info["ArrayTaskId"] == str(i)
        run = tmp_path / "runs" / name
        resolved = yaml.safe_load((run / "config.yaml").read_text())
        assert resolved["optim"]["lr"] == [0.05, 0.2][i] and resolved["train"]["seed"] == 3
        assert resolved["log"]["name"] == name
        assert summary(run)["steps"] == 100 and summary(run)["world_size"] == 1
    assert infos[0]["Restarts"] == "1" and infos[1]["Restarts"] == "0"
    text = read(logs[0])
    saved = int(re.search(r"saved step (\d+); exiting with code 3", text).group(1))
    m = re.search(r"resumed from \S+step_(\d+)", text)
    assert m and int(m.group(1)) == saved and "resumed from" not in read(logs[1]), text[-3000:]


def test_sweep_dry_run_prints_the_array_script(tmp_path):
    """Needs no cluster: a 2 x 2 grid is one array of 4, at most 2 at once; run names in grid order."""
    cmd = [sys.executable, "slurm/submit.py", "--config", "configs/imagenet_resnet50.yaml", "--gpus-per-node", "8",
           "--partition", "gpu", "--dry-run", "--sweep", "optim.lr=0.1,0.2", "--sweep", "train.seed=0,1",
           "--array-parallelism", "2", "data.root=/data/imagenet", f"log.dir={tmp_path}/runs"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    base = f"{tmp_path}/runs/imagenet_resnet50"
    for line in ["#SBATCH --array=0-3%2", f"#SBATCH --output={base}-sweep/%A_%a/%A_%a_0_log.out",
                 "#SBATCH --job-name=imagenet_resnet50", "#SBATCH --requeue", "#SBATCH --signal=USR2@120"]:
        assert line in out, f"{line!r} not in:\n{out}"
    runs = re.findall(r"\[(\d)\] run dir: (\S+)  \((.*)\)", out)
    assert runs == [("0", f"{base}-lr0.1-seed0", "optim.lr=0.1 train.seed=0"),
                    ("1", f"{base}-lr0.1-seed1", "optim.lr=0.1 train.seed=1"),
                    ("2", f"{base}-lr0.2-seed0", "optim.lr=0.2 train.seed=0"),
                    ("3", f"{base}-lr0.2-seed1", "optim.lr=0.2 train.seed=1")], out
    assert "log.name=imagenet_resnet50-lr0.2-seed1" in out and "train.resume=auto" in out
    assert not (tmp_path / "runs").exists()


def test_sweep_names():
    from slurm.submit import split_values, sweep_points

    assert split_values("[30,60],[50,80]") == ["[30,60]", "[50,80]"]
    assert sweep_points(["optim.lr=0.1,1e-3", "data.global_batch=512", "model.name=resnet18"]) == [
        ("lr0.1-bs512-resnet18", ["optim.lr=0.1", "data.global_batch=512", "model.name=resnet18"]),
        ("lr1e-3-bs512-resnet18", ["optim.lr=1e-3", "data.global_batch=512", "model.name=resnet18"])]
    assert sweep_points(["schedule.milestones=[30,60],[50,80]"])[0][0] == "milestones_30_60_"


def test_cpu_share_splits_physical_cores(tmp_path):
    """Needs no cluster: 4 cores x 2 hyperthreads (siblings n and n+4), as sysfs describes them."""
    for c in range(8):
        (tmp_path / f"cpu{c}/topology").mkdir(parents=True)
        (tmp_path / f"cpu{c}/topology/thread_siblings_list").write_text(f"{c % 4},{c % 4 + 4}\n")
    cores = binding.physical_cores(range(8), sysfs=tmp_path)
    assert cores == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [binding.cpu_share(cores, r, 2) for r in range(2)] == [{0, 4, 1, 5}, {2, 6, 3, 7}]
    assert [binding.cpu_share(cores, r, 3) for r in range(3)] == [{0, 4, 1, 5}, {2, 6}, {3, 7}]
    assert [binding.cpu_share(cores, r, 8) for r in range(8)] == [{c} for c in (0, 4, 1, 5, 2, 6, 3, 7)]
    assert [binding.cpu_share([[0], [1]], r, 3) for r in range(3)] == [{0}, {1}, {0}]  # more ranks than CPUs
    assert binding.format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert binding.parse_cpu_list("0-2,5,7-8\n") == {0, 1, 2, 5, 7, 8}


def test_local_ranks_bind_to_disjoint_cpu_shares():
    """Needs no cluster: what a Submitit task does in-process (torch.numa.binding's thread binder)
    and what train.sbatch's worker does on a CPU node (binding.py, then exec): local ranks 0 and 1
    of 2 get disjoint shares that together are the CPUs this process may use ({0} and {1} here);
    each rank's threads come from its own share."""
    mask = os.sched_getaffinity(0)
    show = "import os; print(sorted(os.sched_getaffinity(0)))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    in_process, execed = [], []
    for rank in (0, 1):
        code = ("import os, threading; from slurm.binding import bind; from train.hardware import cpu_share; "
                "go = threading.Event(); t = threading.Thread(target=lambda: go.wait() and "  # started before bind()
                "print(sorted(os.sched_getaffinity(0)))); t.start(); "
                f"cpus = bind('node', {rank}, 2); go.set(); t.join(); print(cpu_share(len(cpus), 1))")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        cpus, threads = r.stdout.splitlines()
        in_process.append(set(json.loads(cpus)))
        assert int(threads) == len(in_process[-1])
        r = subprocess.run([sys.executable, "slurm/binding.py", "--", sys.executable, "-c", show], cwd=ROOT,
                           capture_output=True, text=True, timeout=60,
                           env={**env, "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
        assert r.returncode == 0, r.stderr
        execed.append(set(json.loads(r.stdout)))
        assert f"local rank {rank}/2: CPUs {binding.format_cpu_list(execed[-1])} of" in r.stderr
    for shares in (in_process, execed):
        assert not shares[0] & shares[1] and shares[0] | shares[1] == mask, shares
    assert in_process == execed
    if len(mask) == 2:
        assert in_process == [{min(mask)}, {max(mask)}]
    # srun already bound the task, or --numa-binding off: left alone
    r = subprocess.run([sys.executable, "slurm/binding.py", "--", sys.executable, "-c", show], cwd=ROOT,
                       capture_output=True, text=True, timeout=60,
                       env={**env, "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "SLURM_CPU_BIND_TYPE": "mask_cpu:"})
    assert set(json.loads(r.stdout)) == mask and not r.stderr


def test_torch_numa_binding_api():
    """The two private names of torch.numa.binding that slurm/binding.py calls (torch 2.14 applies
    NumaOptions only inside torchrun), and why CPU nodes do not use torch's modes: without an
    accelerator they raise (so train.sbatch passes --numa-binding only on GPU nodes)."""
    import inspect

    from torch.numa import binding as tb

    params = inspect.signature(tb._maybe_apply_numa_binding_to_current_process).parameters
    assert binding.index_keyword(tb._maybe_apply_numa_binding_to_current_process) in params
    assert set(params) - set(binding.INDEX_KEYWORDS) == {"numa_options"}
    assert list(inspect.signature(tb._bind_all_threads_in_current_process_to_logical_cpus).parameters) == [
        "logical_cpu_indices"]
    assert [m.value for m in tb.AffinityMode] == list(binding.MODES[:-1])
    if not torch.accelerator.is_available():
        with pytest.raises(RuntimeError, match="No accelerator available"):
            tb._get_logical_cpus_to_bind_to(device_index=0, numa_options=tb.NumaOptions(tb.AffinityMode.NODE))


@pytest.mark.parametrize("keyword", ["device_index", "gpu_index", "ordinal"])
def test_accelerator_binding_reads_the_index_keyword(monkeypatch, caplog, keyword):
    """torch 2.8/2.9 name the accelerator index `gpu_index`, 2.14 `device_index` (the device's
    torch may be either): bind() passes the local rank under the name the installed signature has,
    and a signature with neither leaves the process unbound with one warning (fakes of the private
    function; no GPU needed)."""
    import logging

    from torch.numa import binding as tb

    calls = []
    fakes = {"device_index": lambda *, device_index, numa_options: calls.append((device_index, numa_options)),
             "gpu_index": lambda *, gpu_index, numa_options: calls.append((gpu_index, numa_options)),
             "ordinal": lambda *, ordinal, numa_options: calls.append((ordinal, numa_options))}
    monkeypatch.setattr(tb, "_maybe_apply_numa_binding_to_current_process", fakes[keyword])
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(binding.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv("SLURM_CPU_BIND_TYPE", raising=False)
    with caplog.at_level(logging.WARNING, logger="resnet"):
        cpus = binding.bind("socket", 1, 2)
    if keyword == "ordinal":
        assert cpus is None and calls == []
        assert "takes neither of device_index/gpu_index; not bound" in caplog.text
    else:
        assert cpus == os.sched_getaffinity(0) and len(calls) == 1
        assert calls[0][0] == 1 and calls[0][1].affinity_mode == tb.AffinityMode.SOCKET


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
    ("tiny", ["--sweep", "optim.lr=0.1,abc"], "error: config (sweep point lrabc): optim.lr: expected float, got 'abc'"),
    ("tiny", ["--sweep", "optim.lr"], "error: --sweep 'optim.lr': expected KEY=V1,V2,..."),
], ids=["wrong-type", "unknown-key", "invalid-value", "no-data-root", "check-data", "sweep-value", "sweep-form"])
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


def fake_slurm_bin(tmp_path: Path) -> tuple[Path, Path]:
    """Stand-ins for what train.sbatch calls, with no SLURM: `srun` runs its command once (one
    node), `scontrol` records its arguments (and answers `show hostnames`/`show node`), and a
    `python` whose `-m torch.distributed.run` starts GPUS workers with LOCAL_RANK set and exits 1
    if any failed (as torchrun does), whose trainer (`-u train/main.py`) exits with the code of
    its local rank in FAKE_CODES, and which is the real interpreter otherwise."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    scripts = {
        "srun": '#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": f"""#!/bin/bash
echo "$*" >> {calls}
case "$1 $2" in
    "show hostnames") echo n1 ;;
    "show node") echo "NodeName=n1 NodeAddr=127.0.0.1 State=ALLOCATED" ;;
esac
""",
        "python": f"""#!/bin/bash
case "$1" in
    -m) while [[ $1 != --no-python ]]; do shift; done; shift
        pids=()
        for ((r = 0; r < GPUS; r++)); do LOCAL_RANK=$r "$@" & pids+=($!); done
        rc=0
        for p in "${{pids[@]}}"; do wait "$p" || rc=1; done
        exit $rc ;;
    -u) codes=($FAKE_CODES); exit "${{codes[$LOCAL_RANK]}}" ;;
    *) exec {sys.executable} "$@" ;;
esac
""",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir, calls


HUNG = "a rank hung (exit 75): "
NAMED = "{host}: 1 of 2 workers named a hang and exited with code 75"


@pytest.mark.parametrize("codes, env, before, rc, lines", [
    ("75 137", {}, [], 0,
     [NAMED, HUNG + "requeueing job 4242 (1 of MAX_HANG_REQUEUES=3); it resumes from the newest checkpoint"]),
    ("3 75", {"SLURM_RESTART_COUNT": "2", "MAX_HANG_REQUEUES": "2"},
     ["requeue.4242.0", "requeue.4242.1", "requeue.7.0"], 75,
     [NAMED, HUNG + "not requeueing job 4242, requeued for a hang 2 time(s) already (MAX_HANG_REQUEUES=2)",
      "training exited with code 75"]),
    ("3 3", {}, [], 0,
     ["{host}: all 2 workers saved a checkpoint and exited with code 3", "checkpoint saved: requeueing job 4242"]),
    ("1 137", {}, [], 1, ["training exited with code 1"]),
    ("0 0", {"MAX_HANG_REQUEUES": "x"}, [], 2, []),
], ids=["hang", "hang-bound", "saved", "crash", "bad-bound"])
def test_sbatch_requeues_a_hang_at_most_max_hang_requeues_times(tmp_path, codes, env, before, rc, lines):
    """Needs no cluster: train.sbatch's node and batch shells with fake srun/scontrol/torchrun. A node
    reports 75 when a worker exited 75 and not all saved (3); the batch shell requeues on 75 and
    records it in <run>/hang/requeue.<job>.<restart>, at most MAX_HANG_REQUEUES per job."""
    bin_dir, calls = fake_slurm_bin(tmp_path)
    hang = tmp_path / "runs/fk/hang"
    hang.mkdir(parents=True)
    for name in before:
        (hang / name).touch()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RESNET_", "MAX_HANG"))}
    env = {**base, "PATH": f"{bin_dir}:{base['PATH']}", "PYTHON": str(bin_dir / "python"), "REPO": str(ROOT),
           "CONFIG": str(tiny_config(tmp_path, steps=10)), "GPUS": "2", "NUMA_BINDING": "off", "EXIT_GRACE_S": "0",
           "FAKE_CODES": codes, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NNODES": "1", **env}
    r = subprocess.run(["bash", "slurm/train.sbatch", "log.name=fk"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == rc, r.stdout + r.stderr
    said = [ln for ln in r.stdout.splitlines() if not ln.startswith("[train.sbatch] job 4242 restart")]
    host = socket.gethostname().split(".")[0]
    assert said == [f"[train.sbatch] {ln.format(host=host)}" for ln in lines], r.stdout
    requeues = [c for c in (calls.read_text().splitlines() if calls.exists() else []) if c.startswith("requeue")]
    assert requeues == (["requeue 4242"] if re.search("(?<!not )requeueing job", r.stdout) else [])
    requeued_for_hang = HUNG + "requeueing" in r.stdout
    assert sorted(p.name for p in hang.iterdir()) == sorted(before + ["requeue.4242.0"] * requeued_for_hang)
    if rc == 2:
        assert r.stderr.strip() == "[train.sbatch] MAX_HANG_REQUEUES=x: expected a whole number"


HANG_KEYS = ("checkpoint.every_steps=20", "dist.hang_timeout_s=10", "dist.train_timeout_s=60")


def task_pid(argv_has: str, env_has: tuple[str, ...]) -> int | None:
    """The pid of the Python process whose command line holds `argv_has` and whose environment
    holds every `env_has` entry (e.g. RANK=1), or None."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            argv = (environ.parent / "cmdline").read_bytes().split(b"\0")
            env = set(environ.read_bytes().split(b"\0"))
        except OSError:  # gone meanwhile
            continue
        if "python" in Path(argv[0].decode()).name and argv_has.encode() in argv and \
                all(e.encode() in env for e in env_has):
            return int(environ.parent.name)
    return None


def hang_a_rank(run: Path, log: Path, job: str, argv_has: str, env_has: tuple[str, ...]) -> tuple[int, dict]:
    """SIGSTOP the rank once step_40 is complete, wait for the hang line, then for the job to end;
    (newest checkpoint at the stop, the job's info). Asserts the line names that pid within
    dist.hang_timeout_s + 10 s. The stopped process never outlives the test."""
    from train.checkpoint import complete

    def done() -> list[int]:
        return [s for s in checkpoint_steps(run) if complete(run / f"checkpoints/step_{s}")]

    wait_for(lambda: done() and done()[-1] >= 40, 120, "step_40", poll=0.05)
    pid = wait_for(lambda: task_pid(argv_has, env_has), 10, "the rank's process", poll=0.05)
    os.kill(pid, signal.SIGSTOP)
    try:
        t_stop, newest = time.monotonic(), done()[-1]
        m = wait_for(lambda: re.search(r"hang: rank 1 on (\S+) \(pid (\d+)\) sent no heartbeat", read(log)), 40,
                     "the hang line")
        assert time.monotonic() - t_stop <= 10 + 10, read(log)[-3000:]
        assert m.groups() == (socket.gethostname(), str(pid))
        return newest, wait_done(job, log, timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def assert_resumed_after_the_hang(run: Path, text: str, job: str, newest: int) -> None:
    assert len(re.findall(r"hang: rank 1 on ", text)) == 1, text[-4000:]
    assert sorted(p.name for p in (run / "hang").glob("requeue.*")) == [f"requeue.{job}.0"]
    m = re.search(r"resumed from \S+step_(\d+): epoch 1, step (\d+)", text)
    assert m and newest <= int(m.group(1)) == int(m.group(2)) < PREEMPT_STEPS, text[-4000:]
    assert summary(run)["steps"] == PREEMPT_STEPS and summary(run)["world_size"] == 2


@pytest.mark.slow
def test_sbatch_hang_requeues_once_and_matches(cluster, reference, tmp_path):
    """train.sbatch, rank 1 SIGSTOPped after a checkpoint: rank 0 names it and exits 75, torchrun
    kills the stopped one, the node reports 75, the batch shell requeues once; the rerun resumes
    and ends with the uninterrupted run's weights, bit for bit."""
    cfg = tiny_config(tmp_path, steps=PREEMPT_STEPS)
    log = tmp_path / "sbatch-hang.out"
    env = {**os.environ, **JOB_ENV, "CONFIG": str(cfg), "GPUS": "2", "PYTHON": sys.executable,
           "RDZV_PORT": str(free_port())}
    r = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}",
                        "--time=10", "slurm/train.sbatch", "log.name=hsb", *HANG_KEYS],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    run = tmp_path / "runs/hsb"
    newest, info = hang_a_rank(run, log, job, "train/main.py", ("RANK=1", f"SLURM_JOB_ID={job}"))
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    host = socket.gethostname().split(".")[0]
    assert f"[train.sbatch] {host}: 1 of 2 workers named a hang and exited with code 75" in text
    assert (f"[train.sbatch] a rank hung (exit 75): requeueing job {job} (1 of MAX_HANG_REQUEUES=3); it resumes "
            "from the newest checkpoint") in text
    assert "restart 1:" in text and "training exited with code 0" in text
    assert_resumed_after_the_hang(run, text, job, newest)
    assert_same_weights(reference, run)


@pytest.mark.slow
def test_submitit_hang_requeues_once_and_matches(cluster, reference, tmp_path):
    """submit.py, task 1 SIGSTOPped after a checkpoint: rank 0 names it and runs `scontrol requeue`
    before exiting 75; SLURM kills the tasks and reruns the same pickled Trainer
    (train.resume=auto), which ends with the uninterrupted run's weights, bit for bit."""
    cfg = tiny_config(tmp_path, steps=PREEMPT_STEPS)
    job, _ = submit(cfg, "log.name=hsi", *HANG_KEYS)
    run = tmp_path / "runs/hsi"
    log = run / "slurm" / job / f"{job}_0_log.out"
    newest, info = hang_a_rank(run, log, job, "submitit.core._submit", ("SLURM_PROCID=1", f"SLURM_JOB_ID={job}"))
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    assert (f"requeue: requeueing job {job} after the hang (1 of MAX_HANG_REQUEUES=3); it resumes from the newest "
            "checkpoint") in text
    assert re.findall(r"restart (\d), OMP_NUM_THREADS=1,", text) == ["0", "1"], text[-4000:]
    assert_resumed_after_the_hang(run, text, job, newest)
    assert_same_weights(reference, run)
    with open(run / "slurm" / job / f"{job}_0_result.pkl", "rb") as f:  # the rerun's result
        status, result = pickle.load(f)
    assert status == "success" and result["steps"] == PREEMPT_STEPS


def test_a_bad_max_hang_requeues_fails_at_submission(tmp_path):
    """Needs no cluster: the tasks inherit MAX_HANG_REQUEUES from the submitting shell; a value the
    watchdog could not use is one line here, nothing queued."""
    env, calls = fake_sbatch(tmp_path)
    r = run_submit(tiny_config(tmp_path, steps=10), env={**env, "MAX_HANG_REQUEUES": "three"})
    assert_one_error_line(r, "error: MAX_HANG_REQUEUES='three': expected a whole number (hang requeues per job)")
    assert not calls.exists() and not (tmp_path / "runs").exists()
