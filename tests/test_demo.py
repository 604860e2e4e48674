"""The README's demo as a test (slow: ~8-11 minutes on 2 CPUs): real Fashion-MNIST JPEGs, 2 gloo
ranks, the shipped config, >= 92 % top-1. Needs Debian's dataset-fashion-mnist (`make data`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_trainer

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
def test_demo_reaches_92_percent(tmp_path):
    if not DEBIAN.is_dir():
        pytest.fail(f"{DEBIAN} is missing: run `make data` (apt-get install dataset-fashion-mnist) first")
    data = ROOT / "datasets/fashion-mnist"
    subprocess.run([sys.executable, "-m", "data.prepare", "fashion-mnist", str(data)], cwd=ROOT, check=True)
    run_trainer(ROOT / "configs/fashion_mnist_resnet.yaml", f"data.root={data}", f"log.dir={tmp_path}",
                "log.name=demo", "train.resume=off", nproc=2, timeout=1800)
    summary = json.loads((tmp_path / "demo/summary.json").read_text())
    print(f"demo: top-1 {summary['final_top1']:.2f} %, wall {summary['wall_time_s']:.0f} s")
    assert summary["final_top1"] >= 92.0
    assert summary["epochs"] == 5 and summary["world_size"] == 2
