"""No host sync in the step: the guard that stands in for a CUDA run on the CPU.

On CUDA the host must never wait for the device between two metric flushes, or the GPU idles
while the host prepares the next batch. A CPU run cannot sync, so this counts the operations that
*would* sync in a CUDA run, inside the real step loop (train/trainer.py `train_epoch` with EMA,
MixUp/CutMix, accumulation, grad-norm monitoring and TensorBoard on):

- `aten._local_scalar_dense`: `.item()`, `bool()` / `if` of a tensor, `int()`/`float()` of one;
- `aten.lift_fresh`: a tensor built from Python values (`torch.tensor(x, device=cuda)` is a
  blocking copy from pageable memory);
- `Tensor.tolist()`, `.cpu()`, `.numpy()` (device-to-host copies; `tolist` never reaches the
  dispatcher, so they are patched);
- a copy from pageable host memory to a device, seen where a device exists: under fake CUDA
  tensors (FakeTensorMode runs a forward and the EMA's foreach maths on this CPU, not a backward).

Counting stops where the host is meant to work or wait: inside the loader (host-side decode,
sampling and collation happen on CPU tensors in every run; its device copies are pinned and
non-blocking, data/torch_loader.py), in `flush` (the one sync per interval) and in `Run.save`
(one sync per checkpoint, which forces a flush anyway). Ops that read values back only off CUDA
are avoided rather than exempted: one-hot targets are built by scatter (F.one_hot checks the
labels' min on the host except on CUDA).
"""

from __future__ import annotations

import contextlib
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import ROOT, write_config

sys.path.insert(0, str(ROOT))

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default: "item/bool", aten.lift_fresh.default: "tensor from Python values"}


class SyncCounter(TorchDispatchMode):
    """Counts would-be host syncs while not paused; `where` keeps a short stack per hit."""

    def __init__(self, device_only: bool = False):
        """`device_only`: count read-backs of device tensors only (a fake-CUDA run, where a CPU
        tensor's value is the host's own)."""
        super().__init__()
        self.paused, self.hits, self.device_only = 0, [], device_only
        self._patches = contextlib.ExitStack()

    def hit(self, what: str) -> None:
        if self.paused == 0:
            import traceback
            frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[-8:-2]]
            self.hits.append((what, frames))

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING and not (func == aten._local_scalar_dense.default and args[0].device.type == "cpu"
                                    and self.device_only):
            self.hit(SYNCING[func])
        elif func in (aten._to_copy.default, aten.copy_.default):  # host -> device from pageable memory
            src = args[1] if func == aten.copy_.default else args[0]
            dst = args[0].device if func == aten.copy_.default else kwargs.get("device") or src.device
            if src.device.type == "cpu" and dst.type != "cpu" and not src.is_pinned():
                self.hit(f"copy {src.device} -> {dst} from pageable memory")
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        for name in ("tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, name)

            def patched(t, *a, _original=original, _name=name, **k):
                counter.hit(f".{_name}()")
                return _original(t, *a, **k)
            self._patches.enter_context(_patch(torch.Tensor, name, patched))
        return super().__enter__()

    def __exit__(self, *exc):
        self._patches.close()
        return super().__exit__(*exc)


@contextlib.contextmanager
def _patch(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class PausedLoader:
    """The loader with counting paused while it produces a batch (host-side work by design)."""

    def __init__(self, loader, counter: SyncCounter):
        self.loader, self.counter = loader, counter

    def __iter__(self):
        it = iter(self.loader)
        while True:
            with self.counter.pause():
                try:
                    batch = next(it)
                except StopIteration:
                    return
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


GUARDED = ["optim.ema_decay=0.9", "optim.ema_every=1", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
           "optim.accumulate=2", "data.global_batch=16", "log.every=3", "log.grad_norm_every=2",
           "log.tensorboard=true", "log.images=true", "checkpoint.every_steps=4", "optim.grad_clip=1.0",
           "train.epochs=1", "train.resume=off"]


def guarded_epoch(tmp_path, tiny_data, overrides):
    """One real epoch of the trainer's step loop, counted; returns (hits, flushes)."""
    from train import config as config_lib
    from train import trainer
    from train.distributed import DistInfo

    cfg = config_lib.load(str(write_config(tmp_path, tiny_data)), overrides)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    trainer.setup_logging(0)
    run = trainer.build_run(cfg, info, SimpleNamespace(received=False))
    counter = SyncCounter()
    inner = run.train_loader
    if hasattr(inner, "mixer"):  # MixUp/CutMix run in the step on the device: pause only the loader below
        inner.loader = PausedLoader(inner.loader, counter)
    else:
        run.train_loader = PausedLoader(inner, counter)
    flushes = []
    real_flush, real_save = trainer.flush, run.save

    def flush(*a, **k):
        with counter.pause():
            flushes.append((run.state.step, len(counter.hits)))
            return real_flush(*a, **k)

    def save(*a, **k):
        with counter.pause():
            return real_save(*a, **k)
    run.save = save
    run.train_loader.set_epoch(0, 0)
    with _patch(trainer, "flush", flush), counter:
        trainer.train_epoch(run)
    run.checkpointer.close()
    run.monitor.close()
    return counter.hits, flushes


def test_step_loop_has_no_host_sync_between_flushes(tmp_path, tiny_data):
    hits, flushes = guarded_epoch(tmp_path, tiny_data, GUARDED)
    assert len(flushes) >= 2  # the guard saw whole intervals (64 images / 16 = 4 steps: flushes at 3, 4)
    assert hits == [], "\n".join(f"{what}: {' <- '.join(reversed(frames))}" for what, frames in hits[:5])


def test_the_guard_catches_a_sync(tmp_path, tiny_data, monkeypatch):
    """The counter is not blind: an `.item()` per step (a loss print, say) is caught once per step."""
    from train import trainer

    real = trainer.autocast

    @contextlib.contextmanager
    def chatty(device, amp):
        with real(device, amp):
            yield
        torch.ones(1).sum().item()
    monkeypatch.setattr(trainer, "autocast", chatty)
    hits, _ = guarded_epoch(tmp_path, tiny_data, GUARDED)
    assert [what for what, _ in hits] == ["item/bool"] * 8  # 4 steps x 2 micro-batches


def _model_on(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, device=device), torch.nn.BatchNorm2d(4, device=device))


def _fake_cuda_ema_hits() -> tuple[list[str], list[str]]:
    """(ours, torch's) would-be syncs of 3 EMA updates on fake CUDA tensors. Run in a child
    process: fake CUDA devices leave state behind that crashes later tests in this process."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from train.optim import EMA

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _model_on("cuda")
        ours = EMA(model, decay=0.9)
        ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        with SyncCounter(device_only=True) as counter:
            for _ in range(3):
                ours.update()
        with SyncCounter(device_only=True) as theirs:
            for _ in range(3):
                ref.update_parameters(model)
    return [w for w, _ in counter.hits], [w for w, _ in theirs.hits]


def test_ema_update_has_no_device_copy_or_readback():
    """torch's AveragedModel.update_parameters hands `n_averaged.to(device)` (a CPU tensor) to the
    average on every update: on CUDA a blocking copy from pageable memory, seen here on fake CUDA
    tensors. Ours makes no such copy and averages exactly as AveragedModel does."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from train.optim import EMA

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        ours_hits, their_hits = pool.submit(_fake_cuda_ema_hits).result(timeout=300)
    assert ours_hits == []
    assert their_hits == ["copy cpu -> cuda:0 from pageable memory"] * 4  # 2 updates x 2 dtypes

    model = _model_on("cpu")  # the values: equal to AveragedModel's
    ours, ref = EMA(model, decay=0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model(torch.randn(2, 3, 5, 5))  # BN buffers move too
        ours.update()
        ref.update_parameters(model)
    for a, b in zip(ours.averaged.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert ours.updates == 3 and int(ours.averaged.n_averaged) == 3


@pytest.mark.parametrize("overrides", [["data.mixup_alpha=0", "data.cutmix_alpha=0", "optim.ema_decay=0"]])
def test_plain_step_loop_has_no_host_sync(tmp_path, tiny_data, overrides):
    hits, _ = guarded_epoch(tmp_path, tiny_data, GUARDED + overrides)
    assert hits == [], hits[:3]


def test_tf32_is_set_through_the_api_inductor_reads():
    """hardware.allow_tf32 (CUDA runs) sets fp32 matmuls and convolutions to TF32 through the
    `fp32_precision` API; torch.compile's inductor reads that one (compile_fx, utils)."""
    from train import hardware

    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        hardware.allow_tf32()
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32", "tf32")
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
