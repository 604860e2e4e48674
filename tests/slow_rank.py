"""train/main.py with one rank's input pipeline slow, for tests/test_hang.py (torchrun's script).

    SLOW_RANK=1 SLOW_S=0.1 torchrun --nproc_per_node=2 tests/slow_rank.py --config ...

Rank SLOW_RANK gets each training batch SLOW_S seconds late, as from a node whose disk or JPEG
decoding is slower than the others'.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train import trainer  # noqa: E402

build_loaders = trainer.build_loaders


class Late:
    """The loader, each batch SLOW_S s late; everything else as the loader's."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            time.sleep(float(os.environ["SLOW_S"]))
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def late_loaders(*args, **kwargs):
    train, val, classes = build_loaders(*args, **kwargs)
    return (Late(train) if os.environ["RANK"] == os.environ["SLOW_RANK"] else train), val, classes


trainer.build_loaders = late_loaders
sys.argv[0] = str(ROOT / "train" / "main.py")
runpy.run_path(str(ROOT / "train" / "main.py"), run_name="__main__")
