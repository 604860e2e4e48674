"""Shared fixtures: tiny learnable ImageNet-style JPEG folders and a trainer launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40), (40, 220, 220), (220, 40, 220)]


def make_image_folder(root: Path, classes: int = 4, train_per_class: int = 16, val: int = 40,
                      size: int = 32, seed: int = 0) -> Path:
    """<root>/{train,val}/n0000000k/*.JPEG: class k is a noisy image of colour k (learnable)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class * classes), ("val", val)):
        for c in range(classes):
            (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            c = i % classes
            pixels = np.clip(np.array(COLOURS[c % len(COLOURS)]) + rng.normal(0, 40, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / split / f"n{c:08d}" / f"{i:05d}.JPEG", quality=90)
    return root


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests (tests/test_gpu.py: `pytest -m gpu`) skip where no CUDA GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m gpu; benchmarks/gpu.py runs them on a lent one)")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


TINY_CONFIG = """
data: {{root: {root}, batch_size: 8, workers: 0, train_crop: 32, val_resize: 32, val_crop: 32, min_scale: 0.5}}
model: {{name: resnet20, stem: cifar}}
optim: {{lr: 0.1, weight_decay: 5.0e-4}}
schedule: {{name: cosine, warmup_epochs: 0.5}}
train: {{epochs: 2, amp: "off", deterministic: true}}
log: {{dir: {runs}, every: 2, progress: lines}}
checkpoint: {{async_save: false}}
"""


def write_config(tmp_path: Path, data_root: Path, extra: str = "") -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_CONFIG.format(root=data_root, runs=tmp_path / "runs") + extra)
    return p


def run_trainer(config: Path, *overrides: str, nproc: int = 1, check: bool = True, timeout: float = 600,
                max_restarts: int = 0) -> subprocess.CompletedProcess:
    """Run train/main.py as a user would: plain python for 1 rank, torchrun for more."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if nproc == 1 and not max_restarts:
        cmd = [sys.executable, "train/main.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               f"--max-restarts={max_restarts}", "train/main.py"]
    cmd += ["--config", str(config), *overrides]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"trainer failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r
