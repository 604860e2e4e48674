"""Named checkpoint states: any Stateful is one entry, missing ones are reported, RNG streams
resume exactly, and loading refuses a pickled object instead of running it."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from train.checkpoint import Checkpointer, ModelState, OptimizerState, RNGState, Value, load_tensors
from train.config import CheckpointConfig
from train.distributed import DistInfo
from train.integrity import UnsafeCheckpoint
from train.trainer import TrainState

INFO = DistInfo(0, 1, 0, torch.device("cpu"))


class Counter:
    """A state a later feature might add (an EMA, a loader position): only state_dict/load_state_dict."""

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self):
        return {"n": self.n, "t": torch.full((3,), float(self.n))}

    def load_state_dict(self, state):
        self.n = state["n"]
        assert torch.equal(state["t"], torch.full((3,), float(self.n)))


def model_and_opt(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    return model, opt


def test_named_states_round_trip(tmp_path):
    model, opt = model_and_opt(0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    sched.step()
    states = {"model": ModelState(model), "optim": OptimizerState(model, opt), "scheduler": sched,
              "train_state": TrainState(epoch=2, step=17, sample_in_epoch=96, best_top1=81.5),
              "config": Value({"optim": {"lr": 0.4}, "classes": ["a", "b"]}), "counter": Counter(5)}
    ckpt = Checkpointer(CheckpointConfig(async_save=False), tmp_path, INFO)
    path = ckpt.save(states, step=17)

    model2, opt2 = model_and_opt(1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** s)
    fresh = {"model": ModelState(model2), "optim": OptimizerState(model2, opt2), "scheduler": sched2,
             "train_state": TrainState(), "config": Value(), "counter": Counter(), "ema": Counter(9)}
    missing = ckpt.load(path, fresh)
    assert missing == ["ema"] and fresh["ema"].n == 9  # added since: keeps its value
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    assert torch.equal(opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"],
                       opt2.state[opt2.param_groups[0]["params"][0]]["momentum_buffer"])
    assert sched2.state_dict()["last_epoch"] == 1 and sched2.get_last_lr() == sched.get_last_lr()
    assert fresh["train_state"] == TrainState(epoch=2, step=17, sample_in_epoch=96, best_top1=81.5)
    assert fresh["config"].value == {"optim": {"lr": 0.4}, "classes": ["a", "b"]}
    assert fresh["counter"].n == 5
    assert set(load_tensors(path, "model.")) == set(model.state_dict())


def test_rng_streams_resume_exactly(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # a cached Gaussian is part of Python's state
    ckpt = Checkpointer(CheckpointConfig(async_save=False), tmp_path, INFO)
    path = ckpt.save({"rng": RNGState(1)}, step=1)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.load(path, {"rng": RNGState(1)})
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])
    torch.manual_seed(9)
    before = torch.get_rng_state()
    ckpt.load(path, {"rng": RNGState(2)})  # another world size: streams are not restored
    assert torch.equal(torch.get_rng_state(), before)


class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    model, opt = model_and_opt(0)
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoints" / "step_1"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    # a tampered checkpoint: one value of the scheduler's state replaced by a code-running pickle
    tampered = {**sched.state_dict(), "last_epoch": Evil(marker)}
    dcp.save({"model": ModelState(model).state_dict(), "scheduler": tampered}, checkpoint_id=str(path))
    ckpt = Checkpointer(CheckpointConfig(async_save=False), tmp_path, INFO)
    with pytest.raises(UnsafeCheckpoint, match=r"scheduler\.last_epoch.*not plain data"):
        ckpt.load(path, {"model": ModelState(model), "scheduler": sched})
    assert not marker.exists()
    assert set(load_tensors(path, "model.")) == set(model.state_dict())  # export reads tensors only
    assert not marker.exists()
