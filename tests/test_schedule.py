"""Issue 15: the schedule follows samples, data.global_batch and accumulation, and resume refuses
silent recipe changes.

    .venv/bin/python -m pytest -q tests/test_schedule.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_trainer, write_config
from tests.distributed_helpers import run_ranks
from train import config as C
from train.config import ConfigError, DataConfig, OptimConfig, ScheduleConfig, split_batch
from train.optim import build_optimizer, build_scheduler, lr_factor, peak_lr

SCHED = ScheduleConfig(name="cosine", warmup_epochs=1, warmup_start_factor=0.1)


def scheduler(global_batch: int, steps_per_epoch: int, sched=SCHED, epochs=4):
    opt = build_optimizer(OptimConfig(lr=0.1), torch.nn.Linear(2, 2), global_batch)
    return opt, build_scheduler(sched, opt, steps_per_epoch, epochs, global_batch)


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_plain_steps_and_progress_give_the_same_curve():
    for name in ("cosine", "step", "multistep", "poly", "constant"):
        sched = ScheduleConfig(name=name, warmup_epochs=0.5, step_size=1, milestones=[1, 3])
        _, by_step = scheduler(16, 10, sched)
        _, by_progress = scheduler(16, 10, sched)
        for s in range(1, 40):
            by_step.step()
            by_progress.set_progress(s / 10)
            assert by_progress.get_last_lr() == pytest.approx(by_step.get_last_lr()), (name, s)


def test_resume_on_another_global_batch_continues_the_curve_with_the_new_peak():
    """5 steps of 16 samples (16 steps/epoch), then steps of 8 (32 steps/epoch): the LR at every
    sample count is the curve's at samples / 256, times the new peak (linear rule)."""
    opt, a = scheduler(16, 16)
    for s in range(1, 6):
        a.set_progress(s * 16 / 256)
    saved = a.state_dict()
    opt2, b = scheduler(8, 32)
    b.load_state_dict(saved)
    assert b.base_lrs == [peak_lr(OptimConfig(lr=0.1), 8)] * 2 and b.saved_peak == pytest.approx(0.1 * 16 / 256)
    assert b.saved_global_batch == 16
    for samples in range(80, 400, 8):
        b.set_progress(samples / 256)
        want = 0.1 * 8 / 256 * lr_factor(samples / 256, SCHED, 4)
        assert opt2.param_groups[0]["lr"] == pytest.approx(want) == b.get_last_lr()[0]


def test_split_batch():
    d, o = DataConfig(batch_size=8, global_batch=64), OptimConfig()
    assert split_batch(d, o, 2)[:2] == (8, 4)  # 32 per rank: 4 micro-batches of 8
    assert split_batch(d, o, 8)[:2] == (8, 1)
    assert split_batch(d, OptimConfig(accumulate=2), 2)[:2] == (16, 2)  # explicit k wins
    assert split_batch(DataConfig(batch_size=8), OptimConfig(accumulate=3), 2) == (8, 3, 48)  # no global_batch
    with pytest.raises(ConfigError, match="^data.global_batch: 64 does not split over 3 ranks"):
        split_batch(d, o, 3)
    with pytest.raises(ConfigError, match="optim.accumulate=3 equal micro-batches"):
        split_batch(d, OptimConfig(accumulate=3), 2)


def config(**sections) -> C.Config:
    """A Config from {"data": {...}, ...} keyword sections."""
    return C.from_dict(sections)


def test_compare_refuses_recipe_keys_and_logs_the_rest():
    old = C.to_dict(config(optim={"lr": 0.1}, data={"batch_size": 8, "workers": 2, "mean": [0.5], "std": [0.2]},
                         log={"every": 10}))
    new = config(optim={"lr": 0.2, "implementation": "for-loop"},
                 data={"batch_size": 16, "workers": 4, "mean": (0.5,), "std": [0.2]},
                 log={"every": 5}, schedule={"name": "step"})
    refused, logged = C.compare(old, new, world=2, old_world=2)
    assert refused == ["data.batch_size: 8 -> 16 (global batch 16 -> 32)", "optim.lr: 0.1 -> 0.2",
                       "schedule.name: 'cosine' -> 'step'"]
    assert [c.split(":")[0] for c in logged] == ["data.workers", "log.every", "optim.implementation"]
    new.train.allow_changes = ["optim.lr", "schedule.*"]
    assert [c.split(":")[0] for c in C.compare(old, new, 2, 2)[0]] == ["data.batch_size"]
    # the checkpoint's world size unknown and no global batch set: a per-rank batch change is refused
    assert C.compare(old, new, 1, None)[0] == ["data.batch_size: 8 -> 16 (global batch ? -> 16)"]
    # a key added since the checkpoint: compared with its default
    assert C.compare({}, config(), 1, 1) == ([], [])
    assert C.compare({}, config(optim={"ema_decay": 0.9}), 1, 1)[0] == ["optim.ema_decay: 0.0 -> 0.9"]


def test_resume_compares_the_global_batch_and_the_lr_rule():
    """2 ranks x 12 -> 1 rank x 24 keeps the global batch 24: accepted without train.allow_changes,
    with data.global_batch set or not; a changed global batch is refused with one exact line."""
    two_by_12 = C.to_dict(config(data={"batch_size": 12}))
    assert C.check_resume(two_by_12, config(data={"batch_size": 24}), 1, 2, "step_5") == ["data.batch_size: 12 -> 24"]
    kept = C.to_dict(config(data={"batch_size": 12, "global_batch": 24}))
    assert C.check_resume(kept, config(data={"batch_size": 24, "global_batch": 24}), 1, 2, "step_5") == [
        "data.batch_size: 12 -> 24"]
    assert C.check_resume(kept, config(data={"batch_size": 24}), 1, 2, "step_5") == [  # the same 24, now implied
        "data.batch_size: 12 -> 24", "data.global_batch: 24 -> 0"]
    assert C.check_resume(two_by_12, config(data={"batch_size": 12}, optim={"accumulate": 2}), 1, 2, "step_5") == [
        "optim.accumulate: 1 -> 2"]
    with pytest.raises(ConfigError) as e:
        C.check_resume(kept, config(data={"batch_size": 24, "global_batch": 48}), 1, 2, "step_5")
    assert str(e.value) == ("resume from step_5 would change the recipe: data.batch_size: 12 -> 24 (global batch "
                            "24 -> 48); data.global_batch: 24 -> 48; start a new run (log.name=...) or allow it "
                            "with train.allow_changes=[data.batch_size,data.global_batch]")
    # the world size alone changes the global batch (no data.global_batch): no key changed, the linear rule
    assert C.check_resume(two_by_12, config(data={"batch_size": 12}), 1, 2, "step_5") == []
    # the LR rule is optim.lr per optim.lr_reference_batch: the same rule written differently passes
    assert C.check_resume(two_by_12, config(data={"batch_size": 12}, optim={"lr": 0.2, "lr_reference_batch": 512}),
                        2, 2, "step_5") == ["optim.lr: 0.1 -> 0.2", "optim.lr_reference_batch: 256 -> 512"]


# -- accumulation: k micro-batches on W ranks == one batch of k*B*W on one rank ------------------

N, FEATURES, CLASSES = 72, 6, 3


class TensorLoader:
    """The loader contract over tensors, in the global sample order of data/sampler.py."""

    def __init__(self, x, y, batch, rank, world):
        from data.sampler import GlobalBatchSampler

        self.x, self.y, self.sampler = x, y, GlobalBatchSampler(len(x), batch, rank, world, seed=0)
        self.steps_per_epoch, self.batch, self.seen = self.sampler.steps_per_epoch, batch, []

    def set_epoch(self, epoch, start_sample=0):
        self.sampler.set_epoch(epoch, start_sample)

    def __iter__(self):
        idx = [i for i, _ in self.sampler]
        for lo in range(0, len(idx), self.batch):
            b = idx[lo:lo + self.batch]
            self.seen.append(b)
            yield self.x[b], self.y[b]


def accumulate_worker(rank, world, batch, k, epochs):
    from types import SimpleNamespace

    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from train.config import Config
    from train.distributed import DistInfo
    from train.trainer import Plan, Run, train_epoch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, FEATURES, generator=g), torch.randint(0, CLASSES, (N,), generator=g)
    bare = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))  # no BN: see below
    model = DDP(bare) if world > 1 else bare
    gb = batch * world * k
    opt = build_optimizer(OptimConfig(lr=0.4, weight_decay=1e-3), model, gb)
    loader = TensorLoader(x, y, batch, rank, world)
    sched = build_scheduler(SCHED, opt, loader.steps_per_epoch // k, epochs, gb)
    cfg = Config()
    cfg.log.every = 1000
    quiet = SimpleNamespace(log_inputs=lambda *a: None, grad_norms=lambda *a: None, log_train=lambda *a: None)
    run = Run(cfg=cfg, info=DistInfo(rank, world, rank, torch.device("cpu")),
              plan=Plan(micro_batch=batch, accumulate=k, global_batch=gb, steps_per_epoch=loader.steps_per_epoch // k,
                        amp="off", threads=1),
              model=model, bare=bare, optimizer=opt, scheduler=sched, scaler=torch.amp.GradScaler("cpu", enabled=False),
              criterion=nn.CrossEntropyLoss(), ema=None, train_loader=loader, val_loader=None,
              checkpointer=SimpleNamespace(wait_staged=lambda: None), monitor=quiet,
              stop=SimpleNamespace(received=False))
    state, samples = run.state, []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        train_epoch(run)
        samples.append(state.sample_in_epoch)
        state.epoch, state.sample_in_epoch = epoch + 1, 0
    weights = {k_: v.detach().numpy().copy() for k_, v in bare.state_dict().items()}  # no shared fds
    return weights, state.step, samples, loader.seen, sched.get_last_lr()[0]


def test_accumulation_on_two_ranks_equals_one_big_batch():
    """2 ranks x 2 micro-batches of 4 == 1 rank x 16: same weights, same optimizer steps and samples.
    The model has no BN: BN in train mode normalises each micro-batch by its own statistics, so no
    accumulation can equal the big batch there (as with DDP without SyncBN)."""
    (ref, ref_steps, ref_samples, ref_seen, ref_lr), = run_ranks(accumulate_worker, 1, 16, 1, 2)
    got = run_ranks(accumulate_worker, 2, 4, 2, 2)
    for weights, steps, samples, _, lr in got:
        assert steps == ref_steps == 2 * (N // 16) and samples == ref_samples == [N // 16 * 16] * 2
        assert lr == pytest.approx(ref_lr)
        for name in ref:
            torch.testing.assert_close(torch.from_numpy(weights[name]), torch.from_numpy(ref[name]),
                                       rtol=1e-5, atol=1e-6)
    # the 16 samples of each step are the big batch's: 2 ranks x 2 micro-batches of 4, in order
    # (each epoch's last micro-batch cannot fill a step: it is read and drained untrained)
    per_epoch = N // (4 * 2)
    trained = [[b for e in range(2) for b in seen[e * per_epoch:e * per_epoch + per_epoch // 2 * 2]]
               for seen in (got[0][3], got[1][3])]
    per_step = [sorted(trained[0][2 * s] + trained[0][2 * s + 1] + trained[1][2 * s] + trained[1][2 * s + 1])
                for s in range(ref_steps)]
    assert per_step == [sorted(b) for b in ref_seen]


# -- end to end: resume across world sizes and batches -------------------------------------------

def lr_after(run: Path, resumed_step: int) -> dict[int, float]:
    from tests.test_elastic import lr_by_step

    return {s: v for s, v in lr_by_step(run / "tb", last_process=True).items() if s > resumed_step}


def expected(samples: int, global_batch: int) -> float:
    """The tiny config's curve (cosine, 0.5 warmup epochs, 2 epochs of 64 samples) at `samples`."""
    return 0.1 * global_batch / 256 * lr_factor(samples / 64, ScheduleConfig(name="cosine", warmup_epochs=0.5), 2)


@pytest.mark.parametrize("global_batch", [0, 16])
def test_reshard_2x8_to_1x8_continues_the_schedule(tmp_path, tiny_data, global_batch):
    """3 steps on 2 ranks x 8 (48 of 64 samples), then the rest on 1 rank x 8. Without
    data.global_batch the global batch becomes 8: the same samples-based curve, peak rescaled by
    8 / 16. With data.global_batch=16 the survivor runs 2 micro-batches of 8: the very recipe."""
    cfg = write_config(tmp_path, tiny_data)
    args = ("log.every=1", "dist.device=cpu", "dist.cpu_threads=1", "log.images=false", "log.graph=false",
            "log.feature_maps=false", f"data.global_batch={global_batch}")
    run_trainer(cfg, *args, "train.max_steps=3", nproc=2)
    r = run_trainer(cfg, *args)
    run = tmp_path / "runs/tiny"
    after = lr_after(run, 3)
    gb = global_batch or 8
    assert sorted(after) == list(range(4, 4 + (128 - 48) // gb)), sorted(after)
    for s, lr in after.items():
        assert lr == pytest.approx(expected(48 + (s - 3) * gb, gb), rel=1e-5), (s, lr)
    if not global_batch:
        assert "peak LR 0.003125 for global batch 8 (linear rule) instead of the checkpoint's 0.00625" in r.stdout
    else:
        assert "global batch 16 = 1 ranks x 8 x 2 micro-batches" in r.stdout


def test_resume_refuses_a_recipe_change_unless_allowed(tmp_path, tiny_data):
    cfg = write_config(tmp_path, tiny_data)
    args = ("log.images=false", "log.graph=false", "log.feature_maps=false", "log.tensorboard=false")
    run_trainer(cfg, *args, "train.max_steps=2")
    r = run_trainer(cfg, *args, "optim.lr=0.2", "log.every=1", check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optim.lr: 0.1 -> 0.2" in errors[0] and "train.allow_changes=[optim.lr]" in errors[0]
    assert "log.every" not in errors[0]
    r = run_trainer(cfg, *args, "optim.lr=0.2", "log.every=1", "train.allow_changes=[optim.lr]", "train.max_steps=3")
    assert "changes: log.every: 2 -> 1; optim.lr: 0.1 -> 0.2; train.allow_changes" in r.stdout
    assert "peak LR 0.00625 for global batch 8" in r.stdout


def test_resume_2x8_as_1x16_keeps_the_recipe_and_a_new_global_batch_is_refused(tmp_path, tiny_data):
    """2 steps on 2 ranks x 8, then 1 rank x 16: the global batch 16 is kept, so the resume needs no
    train.allow_changes and the LR stays on the very curve (no peak change). 1 rank x 24 would
    make it 24: refused with one line, before anything is written."""
    cfg = write_config(tmp_path, tiny_data)
    args = ("log.every=1", "dist.device=cpu", "dist.cpu_threads=1", "log.images=false", "log.graph=false",
            "log.feature_maps=false")
    run_trainer(cfg, *args, "train.max_steps=2", nproc=2)
    r = run_trainer(cfg, *args, "data.batch_size=24", check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        "error: resume from step_2 would change the recipe: data.batch_size: 8 -> 24 (global batch 16 -> 24); "
        "start a new run (log.name=...) or allow it with train.allow_changes=[data.batch_size]"]
    r = run_trainer(cfg, *args, "data.batch_size=16")
    assert "resume from step_2 changes: data.batch_size: 8 -> 16" in r.stdout and "peak LR" not in r.stdout
    after = lr_after(tmp_path / "runs/tiny", 2)
    assert sorted(after) == list(range(3, 3 + (128 - 32) // 16))
    for s, lr in after.items():
        assert lr == pytest.approx(expected(32 + (s - 2) * 16, 16), rel=1e-5), (s, lr)
