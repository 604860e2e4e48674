"""One run directory, one run: `<run>/run.lock`, taken by rank 0 before anything is written.

Every launcher (torchrun, Submitit, sbatch, a plain `python train/main.py`) goes through
`train.main.main`, which holds this lock around `fit`. A second launch into the same run directory
refuses in one line naming the holder (host, pid, start time, job), with exit code 5, before it
writes anything; every rank of it stops alike (rank 0 decides, broadcast).

A lock whose holder is gone never blocks the run that follows. It is stale when:
  * its host is this host and its process is dead (or its pid now belongs to another process:
    the process start time recorded in the lock differs), e.g. after kill -9 or a torchrun restart;
  * it was taken by this same job on another host: the same SLURM_JOB_ID (a requeue onto another
    node) or the same torchrun run id (an elastic restart that moved rank 0), whose earlier
    incarnation is dead by definition;
  * its heartbeat is older than STALE_AFTER_S (a lost node of another job): the holder touches
    the file every HEARTBEAT_S from a thread.
A stale lock is taken over with a warning that names it. Not covered: two launches racing for the
same stale lock within milliseconds (both may take it over).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger("resnet")
LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # 10 missed heartbeats: generous for clock skew between hosts on NFS


class RunLocked(RuntimeError):
    """Another live run holds the run directory; exit 5. Same message on every rank."""

    same_on_every_rank = True


def job_id() -> str:
    """This job across restarts: SLURM's job id (kept by a requeue), else torchrun's run id."""
    slurm = os.environ.get("SLURM_JOB_ID", "")
    if slurm:
        return f"slurm:{slurm}"
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"torchrun:{run}" if run not in ("", "none") else ""


def _proc_stat(pid: int) -> tuple[str, str]:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat (fields 3 and 22): a pid
    and its start time identify one process; ("", "") where /proc is not readable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return "", ""


def _alive(pid: int, start: str) -> bool:
    if pid <= 0:  # kill(0 or -1, ...) would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    state, now_start = _proc_stat(pid)
    if state in ("Z", "X"):  # killed, not yet reaped by its launcher
        return False
    return not start or not now_start or now_start == start


def stale(holder: dict, age_s: float) -> str | None:
    """Why the lock of `holder`, last refreshed `age_s` seconds ago, no longer holds; None if it does."""
    if holder.get("host") == socket.gethostname():
        if not _alive(int(holder.get("pid", -1)), holder.get("proc_start", "")):
            return f"its process {holder.get('pid')} is gone"
        return None
    if holder.get("job") and holder["job"] == job_id():
        return f"it was taken by this job ({holder['job']}) before it was restarted"
    if age_s > STALE_AFTER_S:
        return f"no heartbeat for {age_s:.0f} s"
    return None


def describe(holder: dict) -> str:
    job = f", {holder['job'].replace(':', ' job ', 1)}" if holder.get("job") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')} since {holder.get('start')}{job}"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunLocked (one line naming the holder)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        me = {"host": socket.gethostname(), "pid": pid, "proc_start": _proc_stat(pid)[1],
              "start": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "job": job_id(), "token": self.token}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder, age = json.loads(self.path.read_text()), time.time() - self.path.stat().st_mtime
                except FileNotFoundError:
                    continue  # released meanwhile
                except (OSError, ValueError):  # being written, or garbage: judge it by its age
                    holder, age = {}, time.time() - self.path.stat().st_mtime
                    if age < 5:
                        time.sleep(0.2)
                        continue
                why = stale(holder, age) if holder else "it is unreadable"
                if why is None:
                    raise RunLocked(f"run directory '{self.path.parent}' is in use by another run: {describe(holder)}; "
                                    "wait for it to end or choose another log.name") from None
                log.warning("taking over %s of %s: %s", self.path, describe(holder), why)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise RunLocked(f"run directory '{self.path.parent}': could not take {self.path}")

    def _mine(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, ValueError):
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                if self._mine():
                    os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._mine():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


@contextlib.contextmanager
def hold(run_dir: Path, info):
    """Rank 0 holds the run directory's lock for the block; every rank raises RunLocked alike if
    another run has it."""
    lock, refused = RunLock(run_dir) if info.is_main else None, None
    if lock is not None:
        try:
            lock.acquire()
        except RunLocked as e:
            refused, lock = str(e), None
    if dist.is_initialized() and info.world_size > 1:
        box = [refused]
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused:
        raise RunLocked(refused)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
