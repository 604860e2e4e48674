"""Copy `data.root` to node-local disk at job start: one verified copy per node, reused after a requeue.

On a cluster the dataset sits on a shared filesystem (Lustre, GPFS, NFS) whose metadata servers
every node's every sample read goes through. With `data.stage_dir` (`$SLURM_TMPDIR`,
`/local/scratch`) the ranks of a node take a file lock in that directory; the first to hold it
copies the dataset while the others wait on the lock, and every rank then reads the local copy.
The copy is written to a temporary folder, checked (every file's size; for a packed dataset also
every file's sha256 from its index.json, computed while copying), given a `.complete` marker
that names the source's digest, and only then renamed into place: a copy cut short (a killed
job, a full disk) is never read, and the next holder of the lock deletes it and starts again. A
complete copy with the same digest is reused as it is, e.g. by a requeued job on the same node
when the directory outlives the job (`/local/scratch` does; `$SLURM_TMPDIR` is per job).

Folders work too, copied as a tree with one copy per file (and every rank lists the source to
fingerprint it); a packed dataset (`python -m data.pack`) is a few large sequential reads and
stages far faster. The lock orders the ranks of a node, so no collective is needed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data import DataError, RankInfo
from data.folder import is_packed
from data.packed import INDEX, read_index

log = logging.getLogger("resnet")
MARKER = ".complete"
CHUNK = 16 << 20


@dataclass
class Manifest:
    """What a complete copy holds: relative path -> (size, sha256 or None for folders), and one
    digest of the whole source (the sha256 of index.json; for folders, of the listing)."""

    files: dict[str, tuple[int, str | None]]
    digest: str

    @property
    def bytes(self) -> int:
        return sum(size for size, _ in self.files.values())


@dataclass
class Staged:
    path: Path
    copied: bool  # by this process (False: a complete copy was there, or another rank made it)
    seconds: float  # copying (0 when reused)
    waited: float  # for the lock
    bytes: int


def manifest(root: Path, workers: int = 16) -> Manifest:
    if is_packed(root):
        read_index(root)  # a format check before trusting its file list
        raw = (root / INDEX).read_bytes()
        files = {name: (f["size"], f["sha256"]) for name, f in json.loads(raw)["files"].items()}
        files[INDEX] = (len(raw), hashlib.sha256(raw).hexdigest())
        return Manifest(files, hashlib.sha256(raw).hexdigest())
    paths = sorted(str(Path(d, f).relative_to(root)) for d, _, names in os.walk(root) for f in names)
    with ThreadPoolExecutor(workers) as pool:
        stats = list(pool.map(lambda rel: os.stat(root / rel), paths, chunksize=256))
    h = hashlib.sha256()
    for rel, s in zip(paths, stats):
        h.update(f"{rel}\0{s.st_size}\0{s.st_mtime_ns}\n".encode())
    return Manifest({rel: (s.st_size, None) for rel, s in zip(paths, stats)}, h.hexdigest())


def is_complete(copy: Path, man: Manifest) -> bool:
    """The marker names this source and every file has its size (a truncated file is caught)."""
    try:
        if json.loads((copy / MARKER).read_text()).get("digest") != man.digest:
            return False
        return all(os.stat(copy / rel).st_size == size for rel, (size, _) in man.files.items())
    except (OSError, ValueError):
        return False


def copy_file(src: Path, dst: Path, size: int, sha256: str | None) -> None:
    """Copy and check one file: its size, and its sha256 (hashed while copying) when known."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if sha256 is None:
        shutil.copy2(src, dst)  # copy_file_range/sendfile; keeps mtimes (the preflight cache key)
    else:
        h, buf = hashlib.sha256(), bytearray(CHUNK)
        view = memoryview(buf)
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            while n := fin.readinto(buf):
                h.update(view[:n])
                fout.write(view[:n])
        if h.hexdigest() != sha256:
            raise DataError(f"data.stage_dir: {src} does not match the sha256 in its index.json (changed or "
                            "corrupt at the source); not staged")
    if dst.stat().st_size != size:
        raise DataError(f"data.stage_dir: {src} changed while it was copied ({dst.stat().st_size} != {size} bytes)")


def stage(root: str | Path, stage_dir: str | Path, rank: int = 0, workers: int = 8) -> Staged:
    """A complete copy of `root` under `stage_dir`, made by whichever caller on this machine takes
    the lock first; callers that find one (or wait for one) just return its path."""
    root, stage_dir = Path(root).resolve(), Path(stage_dir)
    man = manifest(root)
    dest = stage_dir / f"{root.name}-{man.digest[:12]}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(stage_dir / f".{dest.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        waited = time.perf_counter() - t0
        if is_complete(dest, man):
            return Staged(dest, False, 0.0, waited, man.bytes)
        tmp = stage_dir / f".{dest.name}.partial"
        for leftover in (tmp, dest):  # a copy cut short, or damaged since: never read, redone
            shutil.rmtree(leftover, ignore_errors=True)
        free = shutil.disk_usage(stage_dir).free
        if free < man.bytes:
            raise DataError(f"data.stage_dir: {stage_dir} has {free / 2**30:.1f} GiB free, "
                            f"{root} needs {man.bytes / 2**30:.1f} GiB")
        t1 = time.perf_counter()
        tmp.mkdir()
        with ThreadPoolExecutor(workers) as pool:
            jobs = [pool.submit(copy_file, root / rel, tmp / rel, size, sha) for rel, (size, sha) in man.files.items()]
            for job in jobs:
                job.result()
        seconds = time.perf_counter() - t1
        (tmp / MARKER).write_text(json.dumps({
            "digest": man.digest, "source": str(root), "bytes": man.bytes, "files": len(man.files),
            "seconds": round(seconds, 2), "host": socket.gethostname(), "pid": os.getpid(), "rank": rank}))
        os.rename(tmp, dest)
    return Staged(dest, True, seconds, waited, man.bytes)


def staged(cfg, info: RankInfo):
    """`cfg` with `root` pointing at this node's copy of it under `cfg.stage_dir` (expanded like
    a shell would: `data.stage_dir='$SLURM_TMPDIR'`)."""
    stage_dir = os.path.expandvars(cfg.stage_dir)
    if "$" in stage_dir:
        raise DataError(f"data.stage_dir: '{cfg.stage_dir}' names an unset environment variable")
    if not Path(cfg.root).is_dir():
        raise DataError(f"data.root: '{cfg.root}' is not a folder")
    s = stage(cfg.root, stage_dir, info.rank)
    size = f"{s.bytes / 2**30:.2f} GiB"
    if s.copied:
        log.info("staged %s to %s: %s in %.1f s (%.2f GiB/s)", cfg.root, s.path, size, s.seconds,
                 s.bytes / 2**30 / max(s.seconds, 1e-9))
    else:
        marker = json.loads((s.path / MARKER).read_text())
        log.info("data.root %s: using the staged copy %s (%s, copied in %.1f s by rank %s; waited %.1f s)",
                 cfg.root, s.path, size, marker["seconds"], marker["rank"], s.waited)
    return dataclasses.replace(cfg, root=str(s.path))
