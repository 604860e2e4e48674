"""Submit a training run to SLURM with submitit: one task per GPU, requeued on preemption/time-out.

    python slurm/submit.py --config configs/imagenet_resnet50.yaml --nodes 2 --gpus-per-node 8 \\
        --partition gpu --time 72:00:00 data.root=/data/imagenet
    python slurm/submit.py ... --dry-run     # print the sbatch script, submit nothing
    python slurm/submit.py ... --local       # submitit's local executor (no SLURM), e.g. 2 CPU tasks
    python slurm/submit.py ... --sweep optim.lr=0.1,0.2 --sweep train.seed=0,1 --array-parallelism 2

Sweeps: each `--sweep KEY=V1,V2,...` is one axis of a grid; the grid is one Submitit job array
(one array task per point, at most --array-parallelism running at once), and point i trains in
its own run dir `<log.name>-<key><value>-...` (e.g. `imagenet_resnet50-lr0.1-seed1`: the last
part of each key, or lr/bs/wd/... for the common ones; characters other than letters, digits and
`.+-` become `_`). Every point's config is validated before anything is queued. Each array task
is requeued on its own (`scontrol requeue <job>_<i>`), so preemption and time limits work per
point as for a single job. The array's logs are in `<log.dir>/<log.name>-sweep/<job>_<i>/`,
and `<log.dir>/<log.name>-sweep/sweep.json` maps array index -> run name and overrides.

CPU binding (--numa-binding, default node; slurm/binding.py): each task binds itself for its
local rank before training, with torch.numa.binding on GPU nodes (what `torchrun --numa-binding`
does for its workers), or to an exclusive share of the node's CPUs on CPU-only nodes; its
intra-op threads then come from that share (train/hardware.py). `off` leaves the affinity alone,
as does a task srun already bound (--cpu-bind).

Checked here, before anything is queued (one `error: ...` line on stderr, exit code 2):
  * the config and the overrides (unknown key, wrong type, invalid value), with train.config.load.
    The data set is not required to exist on this machine: data often lives on a file system
    that only the compute nodes mount. A `data.root` that is not visible here is a warning, and
    the job checks it when it starts; `--check-data` makes it an error here. A non-synthetic
    loader with no `data.root` at all is always an error.
  * the resource request, with `sbatch --test-only` on the exact batch script (unknown
    partition, more nodes/CPUs/GPUs than the partition has, a time limit over its maximum, ...).
    A rejection by the real `sbatch` is reported the same way.

Every task runs `train.main.main([--config, C, *overrides, train.resume=auto])` in the submitit
process, with MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK exported from the SLURM environment
(MASTER_ADDR: the first node's NodeAddr, which resolves even where its NodeName does not).
Logs go to <run dir>/slurm/; TensorBoard reads <run dir>.

Preemption / time limit, and who does what (submitit 1.5):
  * submitit asks SLURM for `--signal=USR2@<signal-delay>` and, in every task, binds
    SIGUSR2 -> its `checkpoint_and_try_requeue` (rank 0: call our checkpoint(), dump the pickle,
    `scontrol requeue`, then sys.exit(-1) from inside the handler; other ranks: nothing), and
    SIGTERM/SIGCONT -> "bypass" (log and ignore).
  * The trainer (train/trainer.py StopSignal) binds SIGUSR1 and SIGTERM -> "stop at the next logging
    step on all ranks, save a checkpoint, exit with code 3".
  * If submitit's USR2 handler ran as is, rank 0 would requeue and exit in the middle of a step,
    with nothing saved since the last periodic checkpoint. So `__call__` takes SIGUSR2 over:
    it only forwards the request to the trainer's stop flag. The trainer stops every rank at the
    same step, saves (collectively, waiting for the write), and raises SystemExit(3). Only then
    does rank 0 call submitit's original handler, which calls `checkpoint()` (the same run, same
    run dir, `train.resume=auto`), dumps it, requeues the job and exits. The checkpoint is
    therefore complete on disk before `scontrol requeue` kills the other tasks.
  * Exit code 3 without a requeue: when the job is no longer RUNNING (a plain `scancel` sends
    SIGTERM; a time-out; SLURM's own preemption requeue) rank 0 does not requeue; it reports an
    UncompletedJobError so that submitit records the job as ended. A signal that arrives before
    the trainer has installed its handlers (start-up, data loading) is held and re-delivered as
    SIGUSR1 as soon as they are installed.

A hung rank (train/watchdog.py, docs/reliability.md "Hangs and stragglers"): the live ranks exit
75 from the watchdog thread with os._exit (the main thread is stuck in a collective, so nothing in
Python could catch the exit), which would fail the job. So every task runs with
RESNET_REQUEUE_ON_HANG=1 (a value exported when submitting wins; 0 turns it off), and the rank
that names the hang runs `scontrol requeue $SLURM_JOB_ID` before it exits, at most
MAX_HANG_REQUEUES times (env, default 3) per job, counted in <run>/hang/requeue.<job>.<restart>.
SLURM then kills the job's tasks (the stopped one too, after KillWait) and runs the same batch
script again: submitit loads the same <job>_submitted.pkl (checkpoint() is not involved), i.e.
this Trainer with `train.resume=auto`, which resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python slurm/submit.py`: make `train` and `slurm` importable
    sys.path.insert(0, str(ROOT))

REQUEUE_EXIT_CODE = 3  # train.trainer.REQUEUE_EXIT_CODE (not imported: that pulls in torch)
REQUEUE_ON_HANG_ENV = "RESNET_REQUEUE_ON_HANG"  # train.watchdog.REQUEUE_ENV
from slurm.binding import MODES  # noqa: E402  (no torch import)


def _job_state(job_id: str) -> str:
    """SLURM state of a job (RUNNING, COMPLETING, CANCELLED, ...); '' if unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return ""


def requeue_signal(env) -> signal.Signals:
    """The signal submitit asked SLURM for (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return signal.Signals[f"SIG{env.USR_SIG}"]


class Trainer:
    """The submitit callable: one instance per task; `checkpoint()` makes the requeued run."""

    def __init__(self, config: str | None, overrides: list[str], numa_binding: str = "node"):
        self.config = config
        self.overrides = list(overrides)
        self.numa_binding = numa_binding

    def argv(self) -> list[str]:
        argv = ["--config", self.config] if self.config else []
        return argv + self.overrides + ["train.resume=auto"]

    def __call__(self):
        import submitit

        from slurm import binding

        env = submitit.JobEnvironment()
        # CUDA_VISIBLE_DEVICES stays as SLURM set it (all GPUs of the node): the trainer picks
        # cuda:LOCAL_RANK. overwrite: sbatch exports the submitting shell's environment.
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                          overwrite=True)
        if env.cluster == "slurm":  # the first node's NodeName need not resolve; its NodeAddr does
            from train.distributed import slurm_node_address

            os.environ["MASTER_ADDR"] = slurm_node_address(dist_env.master_addr)
            os.environ.setdefault(REQUEUE_ON_HANG_ENV, "1")  # the watchdog requeues on a hang (docstring)
        bound = binding.bind(self.numa_binding, dist_env.local_rank, dist_env.local_world_size)
        # intra-op threads: the trainer decides them from the CPUs bound here (train/hardware.py,
        # `choose`); an OMP_NUM_THREADS other than 1 exported by the submitting shell wins
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        cpus = binding.format_cpu_list(os.sched_getaffinity(0))
        print(f"[submit] {env} restart {restarts}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'auto')}, "
              f"MASTER_ADDR={os.environ['MASTER_ADDR']}, CPUs {cpus} ({'bound' if bound else 'not bound'}): "
              f"train/main.py {shlex.join(self.argv())}", flush=True)

        usr_sig = requeue_signal(env)
        submitit_handler = signal.getsignal(usr_sig)  # checkpoint_and_try_requeue
        pending = threading.Event()
        got = {"requeue_signal": False}

        def early(signum, frame):  # SIGUSR1 before the trainer took it over: hold it
            print(f"[submit] {signal.Signals(signum).name} before training started: held", flush=True)
            pending.set()

        def on_usr_sig(signum, frame):
            got["requeue_signal"] = True
            trainer_handler = signal.getsignal(signal.SIGUSR1)
            if callable(trainer_handler) and trainer_handler is not early:
                trainer_handler(signum, frame)  # sets the trainer's stop flag; it saves, exits 3
            else:
                early(signum, frame)

        def redeliver():  # once the trainer has its SIGUSR1 handler, give it the held signal
            while True:
                pending.wait()
                h = signal.getsignal(signal.SIGUSR1)
                if callable(h) and h is not early:
                    pending.clear()
                    os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.2)

        signal.signal(signal.SIGUSR1, early)
        signal.signal(usr_sig, on_usr_sig)
        threading.Thread(target=redeliver, daemon=True, name="signal-redeliver").start()

        from train import main as train_main

        try:
            return train_main.main(self.argv())
        except SystemExit as e:
            if e.code != REQUEUE_EXIT_CODE:
                raise
            # the trainer saved a checkpoint on a signal: requeue (rank 0 only) if still running
            state = _job_state(env.job_id) if env.cluster == "slurm" else "RUNNING"
            print(f"[submit] checkpoint saved on a signal; job state {state or 'unknown'}", flush=True)
            if env.global_rank != 0:
                return None  # rank 0 requeues the job; this task's result is not collected
            if state.startswith("RUNNING") and callable(submitit_handler):
                signal.signal(usr_sig, submitit_handler)
                # checkpoint() -> dump -> `scontrol requeue` -> sys.exit(-1)
                submitit_handler(usr_sig, None)
            from submitit.core.utils import UncompletedJobError

            raise UncompletedJobError(f"saved a checkpoint on a signal; not requeued (job state {state})") from None

    def checkpoint(self, *args, **kwargs):
        """Called by submitit (rank 0) to requeue: the same run; `train.resume=auto` resumes it."""
        import submitit

        print("[submit] requeueing: the next run resumes from the latest checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(Trainer(self.config, self.overrides, self.numa_binding))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Submit a ResNet training run to SLURM (submitit).")
    p.add_argument("--config", help="YAML recipe, e.g. configs/imagenet_resnet50.yaml")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 on CPU-only clusters")
    p.add_argument("--tasks-per-node", type=int, default=0, help="default: --gpus-per-node (or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=0, help="default: SLURM's")
    p.add_argument("--mem-per-gpu", default="", help="e.g. 64G (needs GPUs)")
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="72:00:00", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--constraint", default="")
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--job-name", default="", help="default: the run's name")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit at which SLURM sends USR2 (save and requeue)")
    p.add_argument("--max-requeues", type=int, default=20, help="submitit's limit on time-out requeues")
    p.add_argument("--numa-binding", default="node", choices=MODES,
                   help="bind each task for its local rank: torchrun's --numa-binding modes on GPU nodes "
                        "(torch.numa.binding); on CPU-only nodes any mode but off gives each task an exclusive "
                        "share of the node's CPUs (default node)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a grid axis (repeat for more): submit a job array, one run dir per point")
    p.add_argument("--array-parallelism", type=int, default=0,
                   help="array tasks of a sweep running at once (default: all)")
    p.add_argument("--local", action="store_true", help="run with submitit's local executor (no SLURM)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    p.add_argument("--check-data", action="store_true",
                   help="require data.root to exist on this machine too (default: a warning; the job checks it)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.4")
    return p.parse_intermixed_args(argv)  # options may follow the overrides


SHORT_KEYS = {"optim.lr": "lr", "data.global_batch": "bs", "data.batch_size": "b", "optim.weight_decay": "wd",
              "optim.momentum": "mom", "train.epochs": "ep", "train.seed": "seed", "model.name": ""}


def split_values(text: str) -> list[str]:
    """'0.1,0.2' -> ['0.1', '0.2']; commas inside [...] or {...} stay ('[30,60],[50,80]')."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(cur)
            cur = ""
        else:
            cur += ch
    return [*values, cur]


def sweep_points(specs: list[str]) -> list[tuple[str, list[str]]]:
    """The grid of `--sweep KEY=V1,V2` axes, in order (the first axis varies slowest): a list of
    (run-name suffix, overrides), e.g. ('lr0.1-seed1', ['optim.lr=0.1', 'train.seed=1'])."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip()
        vals = [v.strip() for v in split_values(values)]
        if not eq or not key or not all(vals):
            fail(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. optim.lr=0.1,0.2)")
        if key in (k for k, _ in axes):
            fail(f"--sweep: {key} given twice; list all its values in one --sweep")
        if key in ("log.name", "log.dir"):
            fail(f"--sweep: {key} cannot be swept (every point gets its own run dir under log.dir)")
        axes.append((key, vals))
    points = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        parts = [SHORT_KEYS.get(key, key.rsplit(".", 1)[-1]) + re.sub(r"[^A-Za-z0-9.+-]", "_", v)
                 for (key, _), v in zip(axes, combo, strict=True)]
        points.append(("-".join(parts), [f"{key}={v}" for (key, _), v in zip(axes, combo, strict=True)]))
    names = [name for name, _ in points]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        fail(f"--sweep: two points would share the run name suffix '{dup}'; use values that differ "
             "in letters or digits")
    return points


def time_to_minutes(t: str) -> int:
    """'90' -> 90; 'HH:MM:SS' / 'MM:SS' / 'D-HH:MM:SS' -> whole minutes (rounded up)."""
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
    parts = [int(x) for x in t.split(":")]
    if len(parts) == 1:  # minutes, or D-HH
        return days * 1440 + (parts[0] * 60 if days else parts[0])
    if len(parts) == 2:  # MM:SS, or D-HH:MM
        parts = [0] + parts if days == 0 else parts + [0]
    h, m, s = parts
    return days * 1440 + h * 60 + m + (1 if s else 0)


def make_executor(args: argparse.Namespace, folder: Path, name: str, array: int = 0):
    """submitit's SlurmExecutor (parameters in sbatch's own names), or its LocalExecutor for --local;
    `array`: the number of points of a sweep (a job array)."""
    import submitit

    gpus = max(args.gpus_per_node, 0)
    tasks = args.tasks_per_node or gpus or 1
    minutes = time_to_minutes(args.time)
    if args.local:  # never a silent fallback: --local is the only way to the local executor
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(nodes=args.nodes, tasks_per_node=tasks, timeout_min=minutes,
                                   **({"gpus_per_node": gpus} if gpus else {}))
        return executor
    cls = submitit.SlurmExecutor
    if args.dry_run and shutil.which("srun") is None:  # write the script on a machine without SLURM
        cls = script_only_slurm_executor()
    executor = cls(folder=folder, max_num_timeout=args.max_requeues)
    params: dict = dict(job_name=name, nodes=args.nodes, ntasks_per_node=tasks, time=minutes)
    if gpus:
        params["gpus_per_node"] = gpus
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    params["signal_delay_s"] = args.signal_delay
    if array and args.array_parallelism:
        params["array_parallelism"] = args.array_parallelism
    # jobs must find `train` and `slurm` wherever the job's working directory is
    params["setup"] = [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if args.partition:
        params["partition"] = args.partition
    if args.mem_per_gpu:
        params["mem_per_gpu"] = args.mem_per_gpu
    extra: dict = {"requeue": True}
    if args.account:
        extra["account"] = args.account
    if args.qos:
        extra["qos"] = args.qos
    if args.constraint:
        extra["constraint"] = args.constraint
    if args.exclusive:
        extra["exclusive"] = True
    params["additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


def script_only_slurm_executor() -> type:
    """A SlurmExecutor that can be built where `srun` is missing, to write the batch script of
    --dry-run (SlurmExecutor refuses to be built there). It overrides `affinity`, submitit's
    public "is this cluster here" score, instead of patching the library's class."""
    import submitit

    class ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1

    return ScriptOnlySlurmExecutor


def sbatch_script(executor, array: int = 0) -> str:
    """The batch script `executor.submit` (or, for `array` points, `submit_array`) would write and
    pass to sbatch, from submitit's own generator. Private API: submitit (1.5) has no public call
    for it (the script exists only inside `submit`); these two names and the `map_count` parameter
    that `submit_array` sets on a copy of the executor are the whole dependency, pinned by
    tests/test_slurm.py."""
    if array:
        copy = type(executor)(folder=executor.folder, max_num_timeout=executor.max_num_timeout)
        copy.update_parameters(**executor.parameters)
        copy.parameters["map_count"] = array
        executor = copy
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


class SubmitError(Exception):
    """A request that SLURM refuses (or cannot be asked); the message is one line."""


def _sbatch_error(stderr: str) -> str:
    """SLURM's reason in sbatch's stderr, on one line. The controller's answer comes last
    ('allocation failure: ...' from --test-only, 'sbatch: error: Batch job submission failed: ...'
    from a submission), after any client-side 'sbatch: error: ...' lines."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("sbatch: error:", "allocation failure:"))]
    msg = (errors or lines or ["no message"])[-1]
    for prefix in ("sbatch: error: ", "allocation failure: ", "Batch job submission failed: "):
        msg = msg.removeprefix(prefix)
    return msg


def describe(args: argparse.Namespace, array: int = 0) -> str:
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    parts = [f"partition '{args.partition}'" if args.partition else "default partition",
             f"{args.nodes} node(s) x {tasks} task(s)"]
    if array:
        parts.insert(0, f"array of {array}" + (f", {args.array_parallelism} at once" if args.array_parallelism else ""))
    if args.gpus_per_node:
        parts.append(f"{args.gpus_per_node} GPU(s)/node")
    if args.cpus_per_task:
        parts.append(f"{args.cpus_per_task} CPU(s)/task")
    return ", ".join(parts) + f", time {args.time}"


def check_request(executor, what: str, array: int = 0) -> None:
    """`sbatch --test-only` on the exact script submitit would submit: SLURM validates the request
    (partition, node/CPU/GPU counts, time limit, account, QOS, array) and queues nothing."""
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: not a SLURM login node? (--local runs without SLURM; "
                          "--dry-run prints the batch script)")
    try:
        r = subprocess.run(["sbatch", "--test-only"], input=sbatch_script(executor, array), capture_output=True,
                           text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SubmitError("sbatch --test-only did not answer in 120 s: is slurmctld up?") from None
    if r.returncode != 0:
        raise SubmitError(f"SLURM rejected the job ({what}): {_sbatch_error(r.stderr or r.stdout)}")


def submit_job(executor, trainer: Trainer | list[Trainer], what: str):
    """executor.submit (a list: submit_array, a job array; returns the list of jobs) with sbatch's
    rejection as a SubmitError (submitit would print the whole stderr and raise FailedJobError)."""
    import io

    from submitit.core.utils import FailedJobError

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            job = executor.submit_array(trainer) if isinstance(trainer, list) else executor.submit(trainer)
        sys.stderr.write(captured.getvalue())  # warnings, if any
        return job
    except FailedJobError as e:
        raise SubmitError(f"SLURM rejected the job ({what}): {_sbatch_error(str(e) or captured.getvalue())}") from None
    except OSError as e:
        raise SubmitError(f"sbatch could not be run: {e}") from None


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def load_config(args: argparse.Namespace, extra: list[str] = (), point: str = ""):
    """The run's Config, validated here so that a typo fails now, not in the queue; `extra`: a
    sweep point's overrides (`point` names it in an error)."""
    from train import config as config_lib

    try:
        cfg = config_lib.load(args.config, [*args.overrides, *extra], check_data=args.check_data)
    except config_lib.ConfigError as e:
        fail(f"config{f' (sweep point {point})' if point else ''}: {e}")
    if cfg.data.loader != "synthetic":
        if not cfg.data.root:  # not a matter of where the data is mounted: always wrong
            fail("config: data.root: not set; pass data.root=/path/to/imagenet (a folder with train/ and val/)")
        from data.folder import has_split

        if not has_split(Path(cfg.data.root) / "train"):  # a folder or a packed dataset
            print(f"warning: data.root '{cfg.data.root}' is not visible on this machine; the job checks it on "
                  "the compute node (--check-data: require it here)", file=sys.stderr)
    return cfg


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if not os.environ.get("MAX_HANG_REQUEUES", "3").isdigit():  # the tasks inherit it (see the docstring)
        fail(f"MAX_HANG_REQUEUES={os.environ['MAX_HANG_REQUEUES']!r}: expected a whole number (hang requeues per job)")
    if args.sweep:
        return main_sweep(args)
    cfg = load_config(args)
    run_dir = cfg.run_dir.resolve()
    # pin the run dir and the config path: the job may start in another working directory
    overrides = [*args.overrides, f"log.dir={run_dir.parent}", f"log.name={run_dir.name}"]
    config = str(Path(args.config).resolve()) if args.config else None
    folder = run_dir / "slurm"
    name = args.job_name or run_dir.name
    executor = make_executor(args, folder if args.local else folder / "%j", name)  # local: %j is made literally

    if args.dry_run:
        print(f"run dir: {run_dir}")
        print(f"job: {Trainer(config, overrides, args.numa_binding).argv()}")
        print(f"parameters: {executor.parameters}")
        print("sbatch script:")
        print(sbatch_script(executor))
        return None

    created = next((d for d in (*reversed(folder.parents), folder) if not d.exists()), None)
    try:
        if not args.local:
            check_request(executor, describe(args))  # before submitit writes anything into the run dir
        job = submit_job(executor, Trainer(config, overrides, args.numa_binding), describe(args))
    except SubmitError as e:
        if created is not None:  # what submitit wrote for a job that was never queued (pickle, script)
            shutil.rmtree(created, ignore_errors=True)
        fail(str(e))
    print(f"submitted job {job.job_id} ({'local' if args.local else 'slurm'}): {name}")
    print(f"  stdout: {job.paths.stdout}")
    print(f"  stderr: {job.paths.stderr}")
    print(f"  run dir: {run_dir}")
    print(f"  tensorboard --logdir {run_dir}")
    if args.local:  # the local executor's job is a child of this process: wait for it
        print(f"waiting for the local job (Ctrl-C cancels it); logs: {job.paths.stdout.parent}", flush=True)
        try:
            result = job.results()[0]  # rank 0's
        except KeyboardInterrupt:
            job.cancel()
            raise
        print(f"done: {result.get('steps')} steps, top-1 {result.get('final_top1'):.2f} %")
    return job


def main_sweep(args: argparse.Namespace):
    """--sweep: one job array, one run dir per grid point (see the module docstring)."""
    base = load_config(args).run_dir.resolve()
    points = sweep_points(args.sweep)
    config = str(Path(args.config).resolve()) if args.config else None
    runs, trainers = [], []
    for suffix, extra in points:
        run = base.with_name(f"{base.name}-{suffix}")
        load_config(args, [*extra, f"log.name={run.name}"], point=suffix)
        overrides = [*args.overrides, *extra, f"log.dir={run.parent}", f"log.name={run.name}"]
        runs.append((run, extra))
        trainers.append(Trainer(config, overrides, args.numa_binding))
    folder = base.with_name(f"{base.name}-sweep")
    name = args.job_name or base.name
    n = len(points)
    executor = make_executor(args, folder if args.local else folder / "%j", name, array=n)
    if args.dry_run:
        print(f"sweep: {n} point(s), array job")
        for i, ((run, extra), trainer) in enumerate(zip(runs, trainers, strict=True)):
            print(f"  [{i}] run dir: {run}  ({' '.join(extra)})")
            print(f"      job: {trainer.argv()}")
        print(f"parameters: {executor.parameters}")
        print("sbatch script:")
        print(sbatch_script(executor, array=0 if args.local else n))
        return None

    created = next((d for d in (*reversed(folder.parents), folder) if not d.exists()), None)
    what = describe(args, array=n)
    try:
        if not args.local:
            check_request(executor, what, array=n)
        jobs = submit_job(executor, trainers, what)
    except SubmitError as e:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        fail(str(e))
    array_id = jobs[0].job_id.split("_")[0]
    (folder / "sweep.json").write_text(json.dumps(
        {"job": array_id, "config": config, "points": [
            {"index": i, "job": job.job_id, "run_dir": str(run), "overrides": extra}
            for i, (job, (run, extra)) in enumerate(zip(jobs, runs, strict=True))]}, indent=1) + "\n")
    print(f"submitted array job {array_id} ({'local' if args.local else 'slurm'}, {n} points): {name}")
    for job, (run, extra) in zip(jobs, runs, strict=True):
        print(f"  {job.job_id}: {run}  ({' '.join(extra)})")
        print(f"    stdout: {job.paths.stdout}")
    print(f"  sweep: {folder / 'sweep.json'}")
    print(f"  tensorboard --logdir {base.parent}")
    if args.local:
        print("waiting for the local jobs (Ctrl-C cancels them)", flush=True)
        try:
            for job, (run, _) in zip(jobs, runs, strict=True):
                result = job.results()[0]
                print(f"done: {run.name}: {result.get('steps')} steps, top-1 {result.get('final_top1'):.2f} %")
        except KeyboardInterrupt:
            for job in jobs:
                job.cancel()
            raise
    return jobs


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        from slurm.submit import main as _main  # pickle Trainer as slurm.submit.Trainer, not __main__

        _main()
