"""Hangs and stragglers, named: one watchdog thread per rank (docs/reliability.md).

Every second each rank's thread writes a heartbeat to the rendezvous store: the step its
training loop reached, the time, host, pid, where its main thread is, and the host seconds its
steps spent before their gradient all-reduce (`BusyTimer`). A stopped process (SIGSTOP, a node
gone) stops all of its threads, so its heartbeat goes stale: it cannot fake one.

  * Collective timeout. Once this process has trained `TRAIN_TIMEOUT_AFTER_STEPS` steps the
    default group's timeout drops from `dist.timeout_s` (long: start-up, data staging, compile)
    to `dist.train_timeout_s` (torchtitan's ~100 s per step). The checkpointer's own gloo group
    keeps the long one: a slow shared file system is not a hang.
  * Hang. When this rank's step has not moved for `dist.hang_timeout_s`, it reads every
    heartbeat. A rank whose heartbeat is older than that (or, all alive, a rank behind the
    others' step) is stalled: this rank appends its threads' Python stacks (faulthandler) and
    the last step, host and place of every rank to <run>/hang/rank<r>.txt (with NCCL also the
    flight recorder), one rank logs one line naming the stalled rank(s) and host(s), and every
    live rank exits with HANG_EXIT_CODE: torchrun --max-restarts restarts the round, which
    resumes from the newest checkpoint; slurm/train.sbatch requeues the job on it; under Submitit
    the rank that names the hang requeues the job itself first (`claim_hang_requeue`). All ranks
    alive and at one step (a long evaluation or save, or a hang inside a collective) is left to
    the collective timeout.
  * Straggler. In DDP every rank steps at the pace of the slowest, so the step time is the same
    everywhere; what differs is the time a rank is busy before the all-reduce (waiting for
    data, the forward pass). Rank 0 reads it from the heartbeats in windows of at least
    `log.every` steps and WINDOW_S seconds, logs rank_busy_ms/rank<r> to TensorBoard and warns
    once, naming the host, about a rank busier than `dist.straggler_ratio` x the median of the
    others for STRAGGLER_WINDOWS windows in a row (`stragglers`). Nothing of it is in the step:
    no host sync, no collective.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("resnet")

HANG_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: a temporary failure, start again (docs/reliability.md)
HEARTBEAT_S = 1.0
STORE_TIMEOUT_S = 5.0  # one store call of the watchdog waits at most this long
TRAIN_TIMEOUT_AFTER_STEPS = 2
STRAGGLER_WINDOWS = 5  # consecutive windows of at least `log.every` steps and WINDOW_S seconds
WINDOW_S = 3.0
ROOT = Path(__file__).resolve().parent.parent
REQUEUE_ENV = "RESNET_REQUEUE_ON_HANG"  # "1": a hang requeues the SLURM job (slurm/submit.py sets it)
MAX_HANG_REQUEUES = 3  # default of the env variable of that name


@dataclass
class Beat:
    """One rank's heartbeat. `time` is the writer's wall clock: ranks on different hosts compare
    it with theirs, so clocks must agree to well under `dist.hang_timeout_s` (NTP does)."""

    step: int
    time: float
    host: str
    pid: int
    where: str = ""  # the main thread's innermost frame in this repository
    busy_s: float = 0.0  # cumulative BusyTimer seconds ...
    busy_steps: int = 0  # ... over this many steps
    done: bool = False  # left training (finished, or failed with its own error)

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> Beat:
        return cls(**json.loads(raw))


def stalled_ranks(beats: Mapping[int, Beat | None], now: float, timeout: float) -> tuple[list[int], str]:
    """(ranks, "stale" | "behind") that stopped making progress, or ([], "") if none did.

    Stale: no heartbeat for `timeout` s, or none at all (None): a stopped process or a lost
    host. Otherwise, all alive, the ranks behind the furthest step. Ranks done training are
    neither. Called once this rank's own step has not moved for `timeout` s."""
    live = {r: b for r, b in beats.items() if b is None or not b.done}
    stale = [r for r in sorted(live) if live[r] is None or now - live[r].time > timeout]
    if stale:
        return stale, "stale"
    steps = {b.step for b in live.values()}
    if len(steps) > 1:
        return [r for r in sorted(live) if live[r].step == min(steps)], "behind"
    return [], ""


def hang_message(ranks: Sequence[int], why: str, beats: Mapping[int, Beat | None], *, now: float, timeout: float,
                 hang_dir: Path, store_host: str = "") -> str:
    """The one line that names the stalled ranks, their hosts, and their last heartbeat's step and
    place (a heartbeat is at most HEARTBEAT_S older than the stop)."""
    known = [r for r in ranks if beats.get(r) is not None]
    who = ", ".join([f"rank {r} on {beats[r].host} (pid {beats[r].pid})" for r in known]
                    + [f"rank {r} (never seen)" for r in ranks if r not in known])
    last = "; ".join(f"step {beats[r].step} in {beats[r].where or '?'}" for r in known)
    if why == "store":
        head = (f"rank 0 on {store_host} does not answer for {timeout:.0f} s (dist.hang_timeout_s): its process "
                "serves the rendezvous store")
    elif why == "stale":
        ages = [now - beats[r].time for r in known]
        head = (f"{who} sent no heartbeat for {min(ages) if ages else float('inf'):.0f} s (dist.hang_timeout_s="
                f"{timeout:g}), the last at {last or '?'}")
    else:
        ahead = max(b.step for b in beats.values() if b is not None)
        head = f"{who} stuck at {last} for {timeout:g} s (dist.hang_timeout_s) while the others reached step {ahead}"
    written = "the other ranks' stacks" + ("" if why == "store" else " and every rank's last step")
    return f"hang: {head}; {written} are in {hang_dir}; exiting with code {HANG_EXIT_CODE} for a restart"


def claim_hang_requeue(environ: Mapping[str, str], hang_dir: Path) -> tuple[str, str]:
    """(SLURM job id to requeue or "", a line to log or "") for a hang, under Submitit.

    Only with RESNET_REQUEUE_ON_HANG=1 and SLURM_JOB_ID set: torchrun restarts on its own, and
    slurm/train.sbatch's batch shell requeues on 75 itself. At most MAX_HANG_REQUEUES (env, default
    3) hang requeues per job, counted as files <hang_dir>/requeue.<job>.<SLURM_RESTART_COUNT>
    (train.sbatch keeps the same ones), not by SLURM_RESTART_COUNT: that also counts the requeues
    on preemption and time limits, which must not use up the hangs' share. The file is created
    exclusively: with the store silent every live rank thinks it names the hang, one requeues."""
    job = environ.get("SLURM_JOB_ID", "")
    if environ.get(REQUEUE_ENV) != "1" or not job:
        return "", ""
    limit = environ.get("MAX_HANG_REQUEUES", str(MAX_HANG_REQUEUES))
    if not limit.isdigit():
        return "", f"requeue: not requeueing job {job}: MAX_HANG_REQUEUES={limit!r} is not a whole number"
    mine = hang_dir / f"requeue.{job}.{environ.get('SLURM_RESTART_COUNT') or 0}"
    done = len([p for p in hang_dir.glob(f"requeue.{job}.*") if p != mine])
    if done >= int(limit):
        return "", (f"requeue: not requeueing job {job}: it was requeued for a hang {done} time(s) already "
                    f"(MAX_HANG_REQUEUES={limit})")
    try:
        mine.open("x").close()
    except FileExistsError:
        return "", ""  # another rank of this run requeues
    return job, (f"requeue: requeueing job {job} after the hang ({done + 1} of MAX_HANG_REQUEUES={limit}); "
                 "it resumes from the newest checkpoint")


def stragglers(windows: Sequence[Mapping[int, float]], ratio: float) -> set[int]:
    """Ranks busier than `ratio` x the median of the other ranks in every window (seconds per
    step, one mapping rank -> value per logging interval). The others' median, not everyone's:
    with two ranks the median of both would hide a rank up to 1.5x slower at ratio 1.2."""
    def slow(w: Mapping[int, float]) -> set[int]:
        others = {r: statistics.median(x for q, x in w.items() if q != r) for r in w} if len(w) > 1 else {}
        return {r for r in others if w[r] > ratio * others[r]}

    return set.intersection(*map(slow, windows)) if windows else set()


class StragglerDetector:
    """`stragglers` over the last STRAGGLER_WINDOWS intervals; each rank is reported once."""

    def __init__(self, ratio: float, windows: int = STRAGGLER_WINDOWS):
        self.ratio, self.history, self.reported = ratio, deque(maxlen=windows), set()

    def update(self, window: Mapping[int, float]) -> list[int]:
        """Add one interval; returns the ranks that just became persistent stragglers."""
        self.history.append(dict(window))
        if len(self.history) < self.history.maxlen:
            return []
        new = stragglers(self.history, self.ratio) - self.reported
        self.reported |= new
        return sorted(new)


class BusyTimer:
    """Host seconds each training step spends before its gradient all-reduce, by hooks (nothing
    in the loop): from the end of the previous optimizer step to the DDP module's forward (data
    wait, host work), plus the bare module's forward (after DDP's buffer broadcast, which waits
    for rank 0), plus, with accumulation, the no_sync micro-batches' backward passes. The last
    backward (its all-reduce waits for the slowest rank) and the optimizer are left out.

    On the CPU this is compute; on a GPU the forward part is launch time, so there a straggler
    shows mostly as data wait. With model.compile the bare module's forward is inside the
    compiled graph and is not timed. With SyncBN the forward holds all-reduces of its own."""

    def __init__(self, model: torch.nn.Module, bare: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 forward: bool = True):
        self.value = (0.0, 0)  # (seconds, steps), replaced whole: the watchdog thread reads it
        self._mark: float | None = None  # end of the previous step or micro-batch forward
        self._t0 = 0.0
        self.handles = [model.register_forward_pre_hook(self._pre), optimizer.register_step_post_hook(self._step)]
        if forward and bare is not model:
            self.handles += [bare.register_forward_pre_hook(self._bare_pre),
                             bare.register_forward_hook(self._bare_post)]

    def _add(self, seconds: float, steps: int = 0) -> None:
        busy, n = self.value
        self.value = (busy + seconds, n + steps)

    def _pre(self, module, args) -> None:
        if module.training and self._mark is not None:
            self._add(time.perf_counter() - self._mark)
        self._mark = None

    def _bare_pre(self, module, args) -> None:
        self._t0 = time.perf_counter()

    def _bare_post(self, module, args, output) -> None:
        if module.training:
            now = time.perf_counter()
            self._add(now - self._t0)
            self._mark = now

    def _step(self, optimizer, args, kwargs) -> None:
        self._mark = time.perf_counter()
        self._add(0.0, 1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def heartbeat_store(timeout_s: float) -> tuple[dist.Store, str]:
    """A second client of the rendezvous store for the watchdog thread, with
    a short timeout so that a silent store never blocks it for `dist.timeout_s`, and keys private
    to this torchrun restart round. Returns it and who serves the store: torchrun's agent (it
    outlives the workers), or rank 0's process (srun and Submitit launches)."""
    agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return (dist.PrefixStore(f"resnet/round_{round_}/watchdog", store),
            f"torchrun's agent at {addr}:{port}" if agent_serves else "rank 0")


def set_collective_timeout(seconds: float) -> None:
    """The default group's timeout for the collectives issued from now on, NCCL and gloo alike
    (torchtitan's `set_pg_timeouts`). Local: each rank sets its own. torchtitan puts a barrier
    before it, so that no rank waits under the short timeout for a peer still starting up; the
    watchdog calls it once this rank has finished its second step, whose gradient all-reduce
    every rank has then joined, so the start-up of every rank is over."""
    dist.set_timeout(datetime.timedelta(seconds=seconds))


class StoreSilent(Exception):
    """The heartbeat store did not answer within STORE_TIMEOUT_S."""


class DeadlineStore:
    """The heartbeat store's calls, each given at most `timeout` s. A TCPStore client waits for a
    reply without a deadline: with its server stopped, check() blocks forever (set() returns, its
    bytes buffered). A call runs in a helper thread; while one is stuck, the next raise at once."""

    def __init__(self, store: dist.Store, timeout: float):
        self.store, self.timeout, self._stuck = store, timeout, None

    def __getattr__(self, method: str):
        def call(*args):
            if self._stuck is not None and self._stuck.is_alive():
                raise StoreSilent(f"a {method} is still waiting")
            out = {}

            def run() -> None:
                try:
                    out["value"] = getattr(self.store, method)(*args)
                except Exception as e:  # noqa: BLE001 - handed to the caller's thread
                    out["error"] = e

            t = threading.Thread(target=run, name="watchdog-store", daemon=True)
            t.start()
            t.join(self.timeout)
            if t.is_alive():
                self._stuck = t
                raise StoreSilent(f"{method} got no answer in {self.timeout:g} s")
            if "error" in out:
                raise out["error"]
            return out["value"]
        return call


def where(frame) -> str:
    """`file:line function` of the innermost frame of this repository's code in a stack, and the
    innermost frame when that is elsewhere (torch, the loader)."""
    def fmt(f, rel: bool) -> str:
        path = Path(f.f_code.co_filename)
        return f"{path.relative_to(ROOT) if rel else path.name}:{f.f_lineno} {f.f_code.co_name}"

    inner, f = frame, frame
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(str(ROOT) + os.sep) and "site-packages" not in name:
            return fmt(f, True) + ("" if f is inner else f" > {fmt(inner, False)}")
        f = f.f_back
    return fmt(inner, False) if inner is not None else "?"


class Watchdog:
    """`with Watchdog(run):` around the training. Off for a world of one (no peer to name, no
    collective to shorten)."""

    def __init__(self, run):
        cfg = run.cfg.dist
        self.rank, self.world, self.state = run.info.rank, run.info.world_size, run.state
        self.hang_dir = Path(run.run_dir) / "hang"
        self.hang_timeout, self.train_timeout, self.timeout = cfg.hang_timeout_s, cfg.train_timeout_s, cfg.timeout_s
        self.log_every, self.tb = run.cfg.log.every, run.monitor.tb
        self.enabled = self.world > 1 and dist.is_initialized()
        self.backend = dist.get_backend() if self.enabled else ""
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.timer = (BusyTimer(run.model, run.bare, run.optimizer, forward=not hasattr(run.model, "_orig_mod"))
                      if self.enabled and cfg.straggler_ratio else None)
        self.detector = StragglerDetector(cfg.straggler_ratio) if self.timer and self.rank == 0 else None
        self.store, self.store_host = None, ""
        self._stop, self._thread, self._main = threading.Event(), None, threading.get_ident()
        self._window: dict[int, tuple[float, int]] | None = None  # cumulative busy at the window's start
        self._window_t = 0.0

    def __enter__(self) -> Watchdog:
        if self.enabled:
            store, self.store_host = heartbeat_store(STORE_TIMEOUT_S)
            self.store = DeadlineStore(store, STORE_TIMEOUT_S)
            self.store.set(f"beat/{self.rank}", self._beat().encode())
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            try:
                self.store.set(f"beat/{self.rank}", self._beat(done=True).encode())
            except (dist.DistError, StoreSilent):
                pass
        if self.timer is not None:
            self.timer.remove()

    def _beat(self, done: bool = False) -> Beat:
        frame = sys._current_frames().get(self._main)
        busy, steps = self.timer.value if self.timer else (0.0, 0)
        return Beat(step=self.state.step, time=time.time(), host=self.host, pid=self.pid,
                    where=where(frame) if frame is not None else "?", busy_s=busy, busy_steps=steps, done=done)

    def _read(self) -> dict[int, Beat | None]:
        keys = [f"beat/{r}" for r in range(self.world)]
        if self.store.check(keys):
            raws = self.store.multi_get(keys)
        else:  # a rank that has not written yet: get() would wait for it
            raws = [self.store.get(k) if self.store.check([k]) else None for k in keys]
        return {r: Beat.decode(raw) if raw is not None else None for r, raw in enumerate(raws)}

    def _watch(self) -> None:
        start = last = self.state.step
        moved, silent_since, armed = time.monotonic(), None, False
        while not self._stop.wait(HEARTBEAT_S):
            step, mono = self.state.step, time.monotonic()
            if step != last:
                last, moved = step, mono
            if not armed and step - start >= TRAIN_TIMEOUT_AFTER_STEPS:
                armed = True
                if 0 < self.train_timeout < self.timeout:
                    set_collective_timeout(self.train_timeout)
                    if self.rank == 0:
                        log.info("collective timeout %d s -> %d s after %d steps (dist.train_timeout_s)%s",
                                 self.timeout, self.train_timeout, TRAIN_TIMEOUT_AFTER_STEPS,
                                 f"; a rank silent for {self.hang_timeout} s is named (dist.hang_timeout_s)"
                                 if self.hang_timeout else "")
            stalled = mono - moved
            try:
                self.store.set(f"beat/{self.rank}", self._beat().encode())
                if self.detector is not None:
                    try:
                        self._straggle(self._read())
                    except (ValueError, TypeError, KeyError, OSError) as e:  # keep the heartbeats going
                        log.warning("straggler detection off: %s", e)
                        self.detector = None
                if stalled >= 2 * HEARTBEAT_S and self.store.check(["hang"]):
                    self._hang(f"rank {self.store.get('hang').decode()} found the hang", {})  # exits
                beats = self._read() if armed and self.hang_timeout and stalled >= self.hang_timeout else None
                silent_since = None
            except (dist.DistError, StoreSilent):  # no answer: rank 0 stopped, if it serves the store
                silent_since = silent_since or mono  # when the unanswered call was made
                beats = None
                silent = time.monotonic() - silent_since
                if (armed and self.hang_timeout and self.store_host == "rank 0"
                        and min(stalled, silent) >= self.hang_timeout):
                    self._hang(hang_message([0], "store", {}, now=time.time(), timeout=silent, hang_dir=self.hang_dir,
                                            store_host=os.environ.get("MASTER_ADDR", "?")), {})
            if beats is not None:
                ranks, why = stalled_ranks(beats, time.time(), self.hang_timeout)
                if ranks:
                    self._hang(hang_message(ranks, why, beats, now=time.time(), timeout=self.hang_timeout,
                                            hang_dir=self.hang_dir), beats)

    def _straggle(self, beats: dict[int, Beat | None]) -> None:
        """Rank 0: close a window once every rank has trained `log.every` steps in it and WINDOW_S
        have passed (a save or an evaluation falls into one window of every rank alike); log each
        rank's busy ms per step; warn about persistent stragglers."""
        if any(b is None or b.done for b in beats.values()):
            return
        now, t = {r: (b.busy_s, b.busy_steps) for r, b in beats.items()}, time.monotonic()
        if self._window is None:
            self._window, self._window_t = now, t
            return
        steps = {r: now[r][1] - self._window[r][1] for r in now}
        if min(steps.values()) < max(1, self.log_every) or t - self._window_t < WINDOW_S:
            return
        busy = {r: (now[r][0] - self._window[r][0]) / steps[r] for r in now}
        self._window, self._window_t = now, t
        self.tb.log({f"rank_busy_ms/rank{r}": 1e3 * v for r, v in busy.items()}, self.state.step)
        for r in self.detector.update(busy):
            others = statistics.median(v for q, v in busy.items() if q != r)
            log.warning("straggler: rank %d on %s is busy %.0f ms per step before the all-reduce (data wait + "
                        "forward), %.2fx the median of the other ranks (%.0f ms), for %d windows of %g s in a row; "
                        "every rank waits for it", r, beats[r].host, 1e3 * busy[r], busy[r] / max(others, 1e-9),
                        1e3 * others, STRAGGLER_WINDOWS, WINDOW_S)

    def _hang(self, line: str, beats: Mapping[int, Beat | None]) -> None:
        """Write this rank's stacks and the table of heartbeats, name the hang (one rank), exit."""
        self.hang_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        with open(self.hang_dir / f"rank{self.rank}.txt", "a") as f:
            f.write(f"== {datetime.datetime.now().isoformat(timespec='seconds')} rank {self.rank} on {self.host} "
                    f"(pid {self.pid}) at step {self.state.step}, restart round "
                    f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}\n{line}\n")
            if beats:
                f.write("rank  host  pid  step  heartbeat_age_s  done  where (all at the rank's last heartbeat)\n")
                for r, b in sorted(beats.items()):
                    f.write(f"{r}  ?\n" if b is None else
                            f"{r}  {b.host}  {b.pid}  {b.step}  {now - b.time:.1f}  {b.done}  {b.where}\n")
            f.write("Python stacks of this rank's threads:\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        if self.backend == "nccl":
            try:
                trace = torch._C._distributed_c10d._dump_nccl_trace()
                (self.hang_dir / f"nccl_trace_rank{self.rank}_watchdog.pkl").write_bytes(trace)
            except Exception as e:  # noqa: BLE001 - the stacks are written; the trace is a bonus
                log.warning("no NCCL flight recorder dump: %s", e)
        try:
            first = self.store.compare_set("hang", "", str(self.rank)).decode() == str(self.rank)
        except (dist.DistError, StoreSilent):
            first = True
        if first:
            log.error(line)
        for h in logging.getLogger().handlers:
            h.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(2 * HEARTBEAT_S)  # the other live ranks see "hang" and write their stacks too
        if first:  # under Submitit nothing outside this process sees the exit code: requeue here
            try:
                job, note = claim_hang_requeue(os.environ, self.hang_dir)
                if job:
                    r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
                    if r.returncode:
                        note = f"requeue: `scontrol requeue {job}` failed: {(r.stderr or r.stdout).strip()}"
                if note:
                    log.warning(note)
            except Exception as e:  # noqa: BLE001 - exit 75 whatever happens
                log.error("requeue: not requeued: %s", e)
            for h in logging.getLogger().handlers:
                h.flush()
        os._exit(HANG_EXIT_CODE)
