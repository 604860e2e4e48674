"""train/main.py with a disk fault injected, for tests/test_faults.py (run it as torchrun's script).

    FAULT_STEP=4 FAULT_KIND=enospc torchrun --nproc_per_node=2 tests/fault_inject.py --config ...

Every write into `checkpoints/step_<FAULT_STEP>/` fails after 4 KiB: `enospc` raises
OSError(ENOSPC), `enforce` raises the RuntimeError torch's zip writer gives on a short write.
Right after the failure the file system reports FAULT_FREE bytes free (default 1 MiB), so the
error line is the same on every machine; before and after, plenty.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import os
import runpy
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from torch.distributed.checkpoint import filesystem  # noqa: E402

STEP, KIND = f"step_{os.environ['FAULT_STEP']}", os.environ.get("FAULT_KIND", "enospc")
FREE = int(os.environ.get("FAULT_FREE", 2**20))
fired = False


class FullDisk(io.RawIOBase):
    """A file that takes 4 KiB, then fails as a full disk does."""

    def __init__(self, f, budget: int = 4096):
        self.f, self.budget = f, budget

    def writable(self):
        return True

    def write(self, b):
        global fired
        n = len(memoryview(b))
        if n > self.budget:
            fired = True
            if KIND == "enforce":
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= n
        return self.f.write(b)

    def tell(self):
        return self.f.tell()

    def flush(self):
        return self.f.flush()

    def fileno(self):
        return self.f.fileno()


_create_stream = filesystem.FileSystem.create_stream


@contextlib.contextmanager
def create_stream(self, path, mode):
    with _create_stream(self, path, mode) as stream:
        yield FullDisk(stream) if STEP in Path(path).parts and "w" in mode else stream


_disk_usage = shutil.disk_usage
Usage = collections.namedtuple("usage", "total used free")


def disk_usage(path):
    """FREE bytes when asked right after the failure (the error line), plenty before and after."""
    global fired
    real = _disk_usage(path)
    free, fired = (FREE if fired else max(real.free, 2**34)), False
    return Usage(real.total, real.used, free)


filesystem.FileSystem.create_stream = create_stream
shutil.disk_usage = disk_usage
sys.argv[0] = str(ROOT / "train/main.py")
runpy.run_path(str(ROOT / "train/main.py"), run_name="__main__")
