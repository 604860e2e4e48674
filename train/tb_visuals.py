"""TensorBoard: the writer of rank 0 (`TensorBoardLogger`), and what it shows beyond scalars: per-stage
norms, image grids, feature maps, graph, hparams.

`TensorBoardLogger.log` takes any dict of scalars, tag = key (torchtitan's `BaseLogger.log(metrics,
step)`): nothing lists tags. On other ranks, or with `log.tensorboard: false`, every call is a
no-op, so callers never test the rank.

Everything here runs on rank 0 only and never between two steps without being asked: stage norms
are two foreach kernels whose result stays on the device until the next logging point (where the
loop syncs anyway); images, feature maps and the graph run at the start and at evaluations.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from pathlib import Path

import torch
from torch import nn
from torchvision.utils import make_grid

log = logging.getLogger("resnet")
GRID_IMAGES = 16  # images (or channels) per grid
GRID_ROW = 8


def bare_module(model: nn.Module) -> nn.Module:
    """The user's module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def stage_of(param_name: str) -> str:
    """`layer2.0.conv1.weight` → `layer2`: the top-level child, which is a stage in any ResNet
    (conv1, bn1, layer1..layerN, fc) and still a sensible group for any other model."""
    return param_name.split(".", 1)[0]


class StageNorms:
    """L2 norms of the gradients and the weights of each stage, computed on the device.

    `compute()` launches a few foreach kernels and returns one tensor `[grad norms..., weight
    norms...]` without reading it, so there is no host sync; the caller reads it at the next
    logging point. After DDP's backward every rank holds the same averaged gradient (and the same
    weights), so rank 0's norms are already the global ones: no collective is needed.
    """

    def __init__(self, model: nn.Module):
        named = [(n, p) for n, p in bare_module(model).named_parameters() if p.requires_grad]
        self.stages = list(dict.fromkeys(stage_of(n) for n, _ in named))
        self.params = [p for _, p in named]
        self.group = [self.stages.index(stage_of(n)) for n, _ in named]
        device = self.params[0].device if self.params else torch.device("cpu")
        self.index = torch.tensor(self.group, device=device)

    def tags(self) -> list[str]:
        return [f"grad_norm/{s}" for s in self.stages] + [f"weight_norm/{s}" for s in self.stages]

    def _per_stage(self, tensors: list[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(self.stages), device=index.device, dtype=torch.float32)
        if tensors:
            norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
            out.index_add_(0, index, norms * norms)
        return out.sqrt()

    @torch.no_grad()
    def compute(self, grad_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        """`grad_scale`: the GradScaler's current scale (fp16), divided out of the gradient norms."""
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        if len(with_grad) == len(self.params):
            grads, gidx = [p.grad for p in self.params], self.index
        else:  # unused parameters have no gradient this step
            grads = [self.params[i].grad for i in with_grad]
            gidx = self.index[torch.tensor(with_grad, dtype=torch.long, device=self.index.device)]
        g = self._per_stage(grads, gidx)
        if grad_scale is not None:
            g = g / grad_scale
        w = self._per_stage([p.detach() for p in self.params], self.index)
        return torch.cat([g, w])


def denormalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised NCHW batch → float [0, 1] on the CPU, as the augmentation produced it."""
    x = images[:GRID_IMAGES].detach().float().cpu()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x * s + m).clamp_(0, 1).contiguous()


def input_grid(images: torch.Tensor, mean, std) -> torch.Tensor:
    return make_grid(denormalise(images, mean, std), nrow=GRID_ROW, padding=2)


def channel_grid(fmap: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) activation → grid of its first channels, each scaled to [0, 1] on its own."""
    x = fmap[0, :GRID_IMAGES].detach().float().cpu().unsqueeze(1)  # (k, 1, H, W)
    lo = x.amin((1, 2, 3), keepdim=True)
    hi = x.amax((1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return make_grid(x.contiguous(), nrow=GRID_ROW, padding=2)  # grayscale is repeated to 3 channels


def feature_stages(model: nn.Module) -> list[str]:
    """Modules whose output is shown: the stem conv and every stage of a ResNet, or every
    top-level child of another model (non-4D outputs are dropped when captured)."""
    names = getattr(model, "stage_names", None)
    if names:
        return [n for n in ["conv1", *names] if hasattr(model, n)]
    return [n for n, _ in model.named_children()]


@torch.no_grad()
def feature_maps(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward one image (1, C, H, W) in eval mode; {stage: grid of its first channels}."""
    model = bare_module(model)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in feature_stages(model):
        def keep(_module, _inputs, output, name=name):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                captured[name] = output.detach().float().cpu()
        handles.append(getattr(model, name).register_forward_hook(keep))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        x = image.to(p.device, non_blocking=True)
        if p.is_contiguous(memory_format=torch.channels_last) and p.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: channel_grid(f) for name, f in captured.items()}


def add_graph(writer, model: nn.Module, example: torch.Tensor) -> str | None:
    """Trace a CPU float copy of the bare module once; returns why it was skipped, or None.

    A copy, because tracing must not touch the training module (DDP hooks, compiled wrappers,
    BN statistics); on the CPU, because the trace is one forward and device memory is the run's.
    """
    try:
        cpu = copy.deepcopy(bare_module(model)).cpu().float().eval()
        x = example[:1].detach().float().cpu().contiguous()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice
            writer.add_graph(cpu, x)
        return None
    except Exception as e:  # noqa: BLE001 - the graph is a nicety; the run must go on
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def flat_hparams(config: dict, extra: dict) -> dict:
    """Scalar config entries as `section.key` (what distinguishes runs), plus `extra`."""
    skip = {"log", "checkpoint"}
    skip_keys = {"data.root", "train.resume", "model.weights", "data.classes"}
    out = {}
    for section, values in config.items():
        if section in skip or not isinstance(values, dict):
            continue
        for k, v in values.items():
            key = f"{section}.{k}"
            if key not in skip_keys and isinstance(v, (bool, int, float, str)):
                out[key] = v
    out.update(extra)
    return out


def add_hparams(writer, hparams: dict, metrics: dict[str, float], step: int) -> None:
    """The HPARAMS session with its metrics as scalars `hparams/<name>` at `step`, in this run's
    own directory (run_name="."), not in a sub-run as `add_hparams` does by default."""
    tags = {f"hparams/{k}": (v if v is not None else math.nan) for k, v in metrics.items()}
    writer.add_hparams(hparams, tags, run_name=".", global_step=step)


# -- the writer (rank 0) ---------------------------------------------------------------------------

class TensorBoardLogger:
    def __init__(self, log_dir: Path, *, enabled: bool):
        self.log_dir, self.writer = Path(log_dir), None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One scalar per entry, tag = key (e.g. "train/loss")."""
        if self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, value: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value, 0)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> str | None:
        """The model graph; returns why it was skipped, or None."""
        return add_graph(self.writer, model, example) if self.writer is not None else "tensorboard is off"

    def hparams(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        if self.writer is not None:
            add_hparams(self.writer, hparams, metrics, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
