"""`python -m train.evaluate`: the trainer's last top-1 from a run dir, a checkpoint and an exported
.pth; exact counts on 2 ranks; size sweeps and flip TTA in one call; one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_trainer, write_config
from train import evaluate


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = write_config(tmp, tiny_data)
    run_trainer(cfg, "log.name=ev", "train.epochs=1", "log.tensorboard=false", nproc=1)
    return tmp, cfg, json.loads((tmp / "runs/ev/summary.json").read_text())


def test_run_dir_checkpoint_and_export_give_the_trainers_top1(trained):
    tmp, cfg, summary = trained
    run = tmp / "runs/ev"
    rows = evaluate.main([str(run)])
    assert len(rows) == 1 and rows[0]["top1"] == summary["final_top1"] and rows[0]["count"] == 40
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert evaluate.main([str(ckpt)])[0]["top1"] == summary["final_top1"]
    pth = tmp / "ev.pth"
    subprocess.run([sys.executable, "-m", "train.export", str(run), str(pth)], cwd=ROOT, check=True)
    rows = evaluate.main([str(pth), "--config", str(cfg)])
    assert rows[0]["top1"] == summary["final_top1"] and rows[0]["loss"] == pytest.approx(summary["final_val_loss"])


def test_sizes_sweep_and_flip_tta_in_one_call(trained):
    tmp, _, summary = trained
    rows = evaluate.main([str(tmp / "runs/ev"), "--sizes", "32:32,40:32", "--tta"])
    assert [(r["val_resize"], r["val_crop"], r["tta"]) for r in rows] == [
        (32, 32, False), (32, 32, True), (40, 32, False), (40, 32, True)]
    assert rows[0]["top1"] == summary["final_top1"] and all(r["count"] == 40 for r in rows)


def test_two_ranks_count_every_image_once(trained):
    tmp, _, summary = trained
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "train.evaluate", str(tmp / "runs/ev")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=True)
    row = r.stdout.strip().splitlines()[-1].split()
    assert row[-1] == "40" and float(row[3]) == pytest.approx(summary["final_top1"], abs=0.005)


@pytest.mark.parametrize("args, message", [(["nowhere"], "source: 'nowhere' is no run"),
                                           (["{run}", "--sizes", "32:40"], "--sizes: '32:40'")])
def test_user_errors_are_one_line(trained, args, message):
    tmp, _, _ = trained
    args = [a.format(run=tmp / "runs/ev") for a in args]
    r = subprocess.run([sys.executable, "-m", "train.evaluate", *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {r.stderr.split('error: ')[1].strip()}"]
    assert message in r.stderr
