"""Monitoring bars: every TensorBoard tag read back with EventAccumulator, a live TensorBoard
server answering its HTTP API, and log files free of progress-bar control characters."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT, run_trainer, write_config

STAGES = ["conv1", "bn1", "layer1", "layer2", "layer3", "fc"]  # resnet20's parameter groups
STEPS_PER_EPOCH = 4  # 64 tiny images, 2 ranks x 8


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("monitor")
    cfg = write_config(tmp, tiny_data)
    r = run_trainer(cfg, "log.name=mon", "log.every=2", "log.grad_norm_every=2", "log.histograms=true",
                    "log.progress=lines", nproc=2)
    return tmp / "runs/mon", r


@pytest.fixture(scope="module")
def events(run) -> EventAccumulator:
    acc = EventAccumulator(str(run[0] / "tb"), size_guidance={"scalars": 0, "images": 0, "histograms": 0,
                                                             "tensors": 0})
    acc.Reload()
    return acc


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def test_scalars_have_every_tag_finite_at_the_right_steps(events):
    total = 2 * STEPS_PER_EPOCH
    every_log = list(range(2, total + 1, 2))
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/top1", "train/lr", "train/images_per_s", "train/images_per_s_per_rank",
                "train/data_wait_fraction", "train/step_time_s"):
        assert tag in scalars, tag
        assert steps(events, tag) == every_log, tag
        assert all(math.isfinite(e.value) for e in events.Scalars(tag)), tag
    for stage in STAGES:
        for kind in ("grad_norm", "weight_norm"):
            tag = f"{kind}/{stage}"
            assert steps(events, tag) == every_log, tag
            assert all(math.isfinite(e.value) and e.value > 0 for e in events.Scalars(tag)), tag
    for tag in ("val/loss", "val/top1", "val/top5", "time/epoch_s", "time/eta_s"):
        assert steps(events, tag) == [STEPS_PER_EPOCH, total], tag
    assert all(0 <= e.value <= 100 for e in events.Scalars("val/top5"))
    assert events.Scalars("time/eta_s")[-1].value == 0.0  # nothing left at the end
    assert 0 <= min(e.value for e in events.Scalars("train/data_wait_fraction")) <= 1
    ratio = [a.value / b.value for a, b in zip(events.Scalars("train/images_per_s"),
                                               events.Scalars("train/images_per_s_per_rank"))]
    assert ratio == pytest.approx([2.0] * len(ratio))
    for tag in ("hparams/top1", "hparams/top5", "hparams/best_top1"):
        assert steps(events, tag) == [total], tag


def test_lr_follows_the_schedule(events):
    lrs = [e.value for e in events.Scalars("train/lr")]
    # lr 0.1 per 256 at global batch 16; warmup ends at step 2 (half an epoch), cosine to 0 at step 8
    assert lrs[0] == pytest.approx(0.1 * 16 / 256)
    assert lrs == sorted(lrs, reverse=True) and len(set(lrs)) == len(lrs)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-6)


def test_images_histograms_graph_and_text(events, run):
    tags = events.Tags()
    inputs = events.Images("train/inputs")
    assert len(inputs) == 1 and inputs[0].step == 0
    # rank 0's batch of 8 images of 32x32 in one row, 2 px padding: make_grid's layout
    assert (inputs[0].width, inputs[0].height) == (8 * 34 + 2, 34 + 2)
    for stage, size in (("conv1", 32), ("layer1", 32), ("layer2", 16), ("layer3", 8)):
        imgs = events.Images(f"features/{stage}")
        assert [i.step for i in imgs] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH], stage
        assert (imgs[0].width, imgs[0].height) == (8 * (size + 2) + 2, 2 * (size + 2) + 2), stage
    assert "features/input" in tags["images"]
    assert "weights/fc.weight" in tags["histograms"] and "grads/layer3.2.conv2.weight" in tags["histograms"]
    assert tags["graph"] is True
    text = {t for t in tags["tensors"]}
    assert {"config/text_summary", "command/text_summary"} <= text
    summary = json.loads((run[0] / "summary.json").read_text())
    assert summary["final_top1"] == events.Scalars("val/top1")[-1].value


def test_log_lines_have_no_control_characters(run):
    out = run[1].stdout
    assert "epoch 2/2 step 4/4" in out and "tensorboard --logdir" in out
    assert not re.search(r"[\r\x1b]", out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_serves_the_run(run):
    logdir = run[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                             "127.0.0.1", "--port", str(port), "--load_fast=false"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/data/plugin/scalars"
        deadline = time.time() + 60
        tags = None
        while time.time() < deadline:
            try:
                tags = json.load(urllib.request.urlopen(f"{base}/tags", timeout=5))
                if tags.get("tb"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert tags and "tb" in tags, tags
        assert {"train/loss", "val/top1", "grad_norm/layer3"} <= set(tags["tb"])
        url = f"{base}/scalars?run=tb&tag=val/top1"
        values = json.load(urllib.request.urlopen(url, timeout=5))
        assert [row[1] for row in values] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
