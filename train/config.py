"""Typed run configuration: YAML recipe + dotted CLI overrides, validated before any process group.

A key is declared in one place, its field: the type (a ``Literal`` lists the allowed values), the
default, its range check and its resume policy, as ``knob(default, resume=..., check=...)``.
``Section.validate`` runs every field's check; a section adds only the checks that span its
fields. Every user mistake becomes an error of one line that names the key. What the config alone
can tell (unknown key, wrong type, impossible value, missing data root) is raised by ``load`` on
every rank before distributed init, so a bad command never leaves a half-started job behind; what
needs the device or the files (fp16 without CUDA, unreadable weights, missing class folders, a
dataset smaller than one global batch) is found after start-up, as a ``ConfigError`` or the data
package's ``DataError``, and ``train/main.py`` prints it as one line and exits 2.

The recipe across world sizes is here too: `split_batch` splits the global batch over the ranks,
and `check_resume` compares a checkpoint's config with the new one by what the recipe means (the
global batch, the LR rule, every other recipe key), each key by its resume policy.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml


class ConfigError(ValueError):
    """A user error in the config: the message is one line that names the key."""


# What a resume may do with a key (`check_resume`):
#   free   only how fast or where the same recipe runs (workers, logging, checkpoints, amp): logged
#   recipe refused unless train.allow_changes names it (a key or `section.*`)
#   split  how the global batch is split (data.batch_size, optim.accumulate, data.global_batch):
#          logged while the effective global batch is kept, e.g. 2 ranks x 12 -> 1 rank x 24
#   rate   the LR rule, optim.lr per optim.lr_reference_batch images: logged while their ratio is kept
Resume = Literal["free", "recipe", "split", "rate"]


class Rule(NamedTuple):
    """A range check: `test(value)` holds, or the error is "<key>: <says>, got <value>"."""

    test: Callable[[Any], bool]
    says: str


positive = Rule(lambda v: v > 0, "must be > 0")
non_negative = Rule(lambda v: v >= 0, "must be >= 0")
probability = Rule(lambda v: 0 <= v <= 1, "must be a probability in [0, 1]")
below_one = Rule(lambda v: 0 <= v < 1, "must be in [0, 1)")


def knob(default: Any, *, resume: Resume, check: Rule | None = None) -> Any:
    """A config field with its resume policy and range check (None where the type is the whole
    check: bool, str, a Literal's choices, a list). A list default is copied for each instance."""
    meta = {"resume": resume, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class Section:
    """A config section: its fields, each checked by its own `check`, and `validate`."""

    def validate(self, prefix: str) -> None:
        """Raise ConfigError for an impossible value; `prefix` is the section's key, e.g. 'data.'.
        A section that checks values against each other extends this (super().validate first)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key, value = f"{prefix}{f.name}", getattr(self, f.name)
            if typing.get_origin(hints[f.name]) is Literal:  # again: a Config built in code skips _merge
                _coerce(key, value, hints[f.name])
            rule = f.metadata.get("check")
            if rule is not None and not rule.test(value):
                raise ConfigError(f"{key}: {rule.says}, got {value}")


@dataclass
class DataConfig(Section):
    # ImageNet-style folder with train/<class>/*.JPEG and val/<class>/*.JPEG, or a data.pack output
    root: str = knob("", resume="recipe")
    # node-local disk ($SLURM_TMPDIR, /local/scratch) to copy data.root to at start (data/stage.py): one
    # copy per node, reused after a requeue; "" = read data.root in place
    stage_dir: str = knob("", resume="free")
    loader: Literal["torch", "dali", "synthetic"] = knob("torch", resume="free")
    dali_device: Literal["auto", "gpu", "cpu"] = knob("auto", resume="free")  # auto: gpu if CUDA
    batch_size: int = knob(256, resume="split", check=positive)  # per rank; with global_batch: the largest micro-batch
    # the recipe's global batch (samples per optimizer step); the per-rank batch and optim.accumulate
    # are derived from it and the world size (`split_batch`), so the recipe survives a world-size
    # change; 0 = off: global batch = batch_size x world size x optim.accumulate
    global_batch: int = knob(0, resume="split", check=non_negative)
    val_batch_size: int = knob(0, resume="free", check=non_negative)  # per rank; 0 = batch_size
    workers: int = knob(8, resume="free", check=non_negative)  # decode processes (torch) or threads (DALI) per rank
    train_crop: int = knob(224, resume="recipe", check=positive)
    val_resize: int = knob(256, resume="recipe", check=positive)  # shorter side before the center crop
    val_crop: int = knob(224, resume="recipe", check=positive)
    # pad: pad + random crop (CIFAR)
    crop: Literal["random_resized", "pad"] = knob("random_resized", resume="recipe")
    pad: int = knob(4, resume="recipe", check=non_negative)  # pixels of zero padding for crop=pad
    # RandomResizedCrop lower area bound
    min_scale: float = knob(0.08, resume="recipe", check=Rule(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # progressive resizing (FFCV): train at `progressive_min_crop` until `progressive_start_epoch`,
    # then rise linearly (in steps of 32 px) to `train_crop` at `progressive_end_epoch`; 0 = off
    progressive_min_crop: int = knob(0, resume="recipe", check=non_negative)
    progressive_start_epoch: int = knob(0, resume="recipe", check=non_negative)
    progressive_end_epoch: int = knob(0, resume="recipe", check=non_negative)
    hflip: bool = knob(True, resume="recipe")
    # after crop and flip, on both loaders (data/augment.py): torchvision v2 / nvidia.dali.auto_aug;
    # TrivialAugmentWide | RandAugment
    auto_augment: Literal["none", "trivial_augment", "rand_augment"] = knob("none", resume="recipe")
    rand_augment_n: int = knob(2, resume="recipe", check=positive)  # RandAugment: ops per image (torchvision's)
    # RandAugment: magnitude bin, 0..30 (torchvision's default 9)
    rand_augment_m: int = knob(9, resume="recipe",
                               check=Rule(lambda v: 0 <= v <= 30, "must be a magnitude bin in 0..30"))
    # probability of v2.RandomErasing (value 0 on the normalised image); 0 = off
    random_erasing: float = knob(0.0, resume="recipe", check=probability)
    # repeated augmentation (DeiT/torchvision RASampler, data/sampler.py): each image k times an epoch on
    # different ranks, differently augmented; the epoch stays ~n samples (n // 256 * 256); 1 = off
    repeated_aug: int = knob(1, resume="recipe", check=positive)
    # MixUp / CutMix on the device after the loader, on every loader (data/mix.py): Beta(alpha, alpha)
    # mixing weights; 0 = off. The train loss sees soft targets; validation is never mixed.
    mixup_alpha: float = knob(0.0, resume="recipe", check=non_negative)
    cutmix_alpha: float = knob(0.0, resume="recipe", check=non_negative)
    # probability that a batch is mixed at all (timm's mixup_prob)
    mix_prob: float = knob(1.0, resume="recipe", check=probability)
    # with both alphas > 0: probability of CutMix instead of MixUp (timm's)
    mix_switch_prob: float = knob(0.5, resume="recipe", check=probability)
    mean: tuple[float, ...] = knob((0.485, 0.456, 0.406), resume="recipe")
    std: tuple[float, ...] = knob((0.229, 0.224, 0.225), resume="recipe")  # as long as mean, positive
    num_classes: int = knob(0, resume="recipe", check=non_negative)  # 0 = count the class folders
    classes: list[str] = knob([], resume="recipe")  # subset of class folders; [] = all
    pin_memory: bool = knob(True, resume="free")
    # epoch length of data.loader=synthetic (ImageNet's)
    synthetic_samples: int = knob(1281167, resume="free", check=positive)

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.progressive_min_crop and not (
                self.progressive_min_crop <= self.train_crop
                and self.progressive_start_epoch <= self.progressive_end_epoch):
            raise ConfigError(f"{prefix}progressive_min_crop: needs 0 < progressive_min_crop <= train_crop "
                              "and progressive_start_epoch <= progressive_end_epoch")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError(f"{prefix}mean/{prefix}std: need the same length and positive std")
        if self.val_resize < self.val_crop:
            raise ConfigError(f"{prefix}val_resize: {self.val_resize} is smaller than "
                              f"{prefix}val_crop {self.val_crop}")


@dataclass
class ModelConfig(Section):
    name: str = knob("resnet50", resume="recipe")
    zero_init_residual: bool = knob(True, resume="recipe")
    # imagenet: 7x7/2 + max-pool; cifar: 3x3/1
    stem: Literal["auto", "imagenet", "cifar"] = knob("auto", resume="recipe")
    shortcut: Literal["auto", "A", "B", "C"] = knob("auto", resume="recipe")
    stride_in_1x1: bool = knob(False, resume="recipe")  # True = the paper's ResNet v1, False = v1.5 (torchvision)
    # squeeze-and-excitation (Hu et al. 2018) in every block; the seresnet* names imply it
    se: bool = knob(False, resume="recipe")
    weights: str = knob("", resume="recipe")  # local .pth (torchvision state_dict or project export)
    freeze_stages: int = knob(0, resume="recipe", check=non_negative)
    new_classifier: bool = knob(False, resume="recipe")  # with weights: re-initialise fc (transfer to other classes)
    channels_last: bool = knob(True, resume="free")
    sync_bn: bool = knob(True, resume="recipe")  # only when world_size > 1
    # torch.compile: auto = where the planned steps repay it (train/hardware.py compile_choice: fp32 on the
    # CPU at crops <= 64 px from ~10 min of planned compute per rank); on | off
    compile: Literal["auto", "on", "off"] = knob("auto", resume="free")


@dataclass
class OptimConfig(Section):
    name: Literal["sgd", "lars", "lamb"] = knob("sgd", resume="recipe")  # lars, lamb: timm.optim's (train/optim.py)
    lr: float = knob(0.1, resume="rate", check=positive)  # per `lr_reference_batch` images; linear in the global batch
    lr_reference_batch: int = knob(256, resume="rate", check=positive)
    momentum: float = knob(0.9, resume="recipe", check=non_negative)
    nesterov: bool = knob(False, resume="recipe")
    weight_decay: float = knob(1e-4, resume="recipe", check=non_negative)
    # False: no decay on norm-layer parameters (and biases, unless bias_weight_decay)
    bn_weight_decay: bool = knob(False, resume="recipe")
    # the other biases (fc, SE); as_bn: as bn_weight_decay
    bias_weight_decay: Literal["as_bn", "on", "off"] = knob("as_bn", resume="recipe")
    label_smoothing: float = knob(0.0, resume="recipe", check=below_one)
    # training loss (train/optim.py): ce = softmax cross-entropy; bce = binary cross-entropy per class
    # on the (soft) targets, as timm's BinaryCrossEntropy in "ResNet strikes back"
    loss: Literal["ce", "bce"] = knob("ce", resume="recipe")
    # bce: targets above it -> 1, the rest -> 0 (timm --bce-target-thresh); 0 = off
    bce_target_threshold: float = knob(0.0, resume="recipe", check=below_one)
    # bce: sum over classes, mean over batch (timm --bce-sum); False: mean of both (timm)
    bce_sum: bool = knob(False, resume="recipe")
    grad_clip: float = knob(0.0, resume="recipe", check=non_negative)  # max global grad norm; 0 = off
    # micro-batches per optimizer step (gradient accumulation, DDP no_sync on all but the last);
    # with data.global_batch: must split the per-rank batch, or 1 = derive it from data.batch_size
    accumulate: int = knob(1, resume="split", check=positive)
    # weight EMA (train/optim.py, torch.optim.swa_utils.AveragedModel): decay per optimizer step, 0 = off;
    # updated every `ema_every` steps with decay ** ema_every; evaluated as val_ema/*, saved as "ema"
    ema_decay: float = knob(0.0, resume="recipe", check=Rule(lambda v: 0 <= v < 1, "must be in [0, 1) (0 = off)"))
    ema_every: int = knob(1, resume="recipe", check=positive)
    implementation: Literal["foreach", "fused", "for-loop"] = knob("foreach", resume="free")

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.implementation == "fused" and self.name != "sgd":
            raise ConfigError(f"{prefix}implementation: fused is for sgd only; {self.name} takes foreach or for-loop")


@dataclass
class ScheduleConfig(Section):
    name: Literal["cosine", "step", "multistep", "poly", "constant"] = knob("cosine", resume="recipe")
    warmup_epochs: float = knob(0.0, resume="recipe", check=non_negative)
    warmup_start_factor: float = knob(0.1, resume="recipe", check=non_negative)
    step_size: int = knob(30, resume="recipe", check=positive)  # epochs, for step
    milestones: list[int] = knob([30, 60, 80], resume="recipe")  # epochs, for multistep
    gamma: float = knob(0.1, resume="recipe", check=non_negative)
    min_lr_factor: float = knob(0.0, resume="recipe", check=non_negative)  # cosine and poly end at lr * min_lr_factor
    power: float = knob(2.0, resume="recipe", check=non_negative)  # poly: (1 - progress) ** power, as MLPerf's LARS


@dataclass
class TrainConfig(Section):
    epochs: int = knob(90, resume="recipe", check=positive)
    # auto: from the hardware (train/hardware.py): bf16 on sm >= 8.0, else fp16; on the CPU bf16
    # only where it is native (AMX/AVX512-BF16) and a probe finds it faster, else fp32 ("off")
    amp: Literal["auto", "off", "bf16", "fp16"] = knob("auto", resume="free")
    seed: int = knob(0, resume="recipe", check=non_negative)
    deterministic: bool = knob(False, resume="free")
    eval_every: int = knob(1, resume="free", check=positive)  # epochs
    # evaluate on the mean logits of each image and its mirror (flip TTA)
    eval_hflip: bool = knob(False, resume="free")
    # stop after this many global steps (tests, benchmarks); 0 = off
    max_steps: int = knob(0, resume="free", check=non_negative)
    resume: str = knob("auto", resume="free")  # auto (latest in run dir) | off | path to a checkpoint dir
    # recipe keys a resume may change (`check_resume`), e.g. [optim.lr, schedule.*]; others stop it
    allow_changes: list[str] = knob([], resume="free")


@dataclass
class LogConfig(Section):
    dir: str = knob("runs", resume="free")
    name: str = knob("", resume="free")  # run directory is <dir>/<name>; "" = the config file's stem
    every: int = knob(50, resume="free", check=positive)  # steps between reduced metrics (the only host sync)
    tensorboard: bool = knob(True, resume="free")
    # auto: a bar on a terminal, else lines
    progress: Literal["auto", "bar", "lines", "off"] = knob("auto", resume="free")
    # steps between per-stage gradient and weight norms; 0 = off
    grad_norm_every: int = knob(50, resume="free", check=non_negative)
    histograms: bool = knob(False, resume="free")  # weight and gradient histograms every epoch
    images: bool = knob(True, resume="free")  # a grid of augmented training inputs at the start
    # stage activations of a fixed validation image at every evaluation
    feature_maps: bool = knob(True, resume="free")
    graph: bool = knob(True, resume="free")  # the model graph (traced once on a CPU copy)


@dataclass
class CheckpointConfig(Section):
    every_epochs: int = knob(1, resume="free", check=non_negative)
    every_steps: int = knob(0, resume="free", check=non_negative)
    keep: int = knob(3, resume="free", check=Rule(lambda v: v >= 1, "must be >= 1"))
    keep_best: bool = knob(True, resume="free")
    # best.json: the model's val top-1 or the EMA's (optim.ema_decay)
    best_by: Literal["val", "val_ema"] = knob("val", resume="free")
    async_save: bool = knob(True, resume="free")
    # a save that cannot be written (disk full, write error): stop = exit 4, the previous checkpoint
    # intact; skip = one warning, training goes on (train/checkpoint.py, docs/reliability.md)
    on_error: Literal["stop", "skip"] = knob("stop", resume="free")


@dataclass
class DistConfig(Section):
    backend: Literal["auto", "nccl", "gloo"] = knob("auto", resume="free")  # auto: nccl on CUDA, gloo on CPU
    device: Literal["auto", "cuda", "cpu"] = knob("auto", resume="free")
    timeout_s: int = knob(1800, resume="free", check=positive)
    bucket_cap_mb: int = knob(25, resume="free", check=positive)
    gradient_as_bucket_view: bool = knob(True, resume="free")
    static_graph: bool = knob(False, resume="free")
    # intra-op threads per rank; 0 = from its share of the node's CPUs (train/hardware.py `choose`)
    cpu_threads: int = knob(0, resume="free", check=non_negative)
    # hangs and stragglers (train/watchdog.py, docs/reliability.md): after a rank's first 2 steps
    # the collective timeout drops from timeout_s (start-up, staging) to train_timeout_s (0: keep
    # timeout_s); a rank without a heartbeat for hang_timeout_s is named and the others exit 75
    # (0: off); a rank busy straggler_ratio x the others' median for 5 windows of 3 s is named (0: off)
    train_timeout_s: int = knob(100, resume="free", check=non_negative)
    hang_timeout_s: int = knob(60, resume="free", check=non_negative)
    straggler_ratio: float = knob(1.2, resume="free", check=Rule(lambda v: v == 0 or v > 1, "must be 0 (off) or > 1"))

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        limit = min(self.train_timeout_s or self.timeout_s, self.timeout_s)  # the training collective timeout
        if self.hang_timeout_s >= limit:
            raise ConfigError(f"{prefix}hang_timeout_s: must be below the training collective timeout ({limit} s: "
                              f"{prefix}train_timeout_s, at most {prefix}timeout_s), or that timeout ends the run "
                              f"before the hung rank is named; got {self.hang_timeout_s}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.log.dir) / self.log.name


def key_fields() -> dict[str, dataclasses.Field]:
    """Every key as `section.name`, with its field (its metadata holds resume and check)."""
    cfg = Config()
    return {f"{s.name}.{f.name}": f for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; allow int→float and list→tuple, nothing else."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in allowed):
            value = "on" if value else "off"  # YAML 1.1 reads a bare `off` as False
        if not any(type(value) is type(a) and value == a for a in allowed):
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp)
        items = [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
        return origin(items)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `1e-5` (no dot) as a string
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads a bare `off` as False
        return "on" if value else "off"
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _merge(obj: Any, values: dict, prefix: str = "") -> None:
    """Write a nested dict into the dataclass tree `obj`, rejecting unknown keys."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown(key, [f"{prefix}{n}" for n in names])
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section of keys, got {value!r}")
            _merge(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def parse_override(arg: str, cfg: Config) -> dict:
    """`optim.lr=0.4` → {"optim": {"lr": 0.4}}; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in arg:
        raise ConfigError(f"override '{arg}' is not of the form section.key=value")
    key, raw = arg.split("=", 1)
    if key not in (keys := list(key_fields())):
        raise _unknown(key, keys)
    value = _safe_yaml(raw, f"override '{arg}'") if raw != "" else ""
    section, name = key.split(".", 1)
    field_tp = typing.get_type_hints(type(getattr(cfg, section)))[name]
    if _is_text(field_tp) and not isinstance(value, str):
        value = raw  # `log.name=001` and `train.amp=off` stay strings
    return {section: {name: value}}


def _is_text(tp: Any) -> bool:
    """A str field, or a Literal of strings only."""
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def validate(cfg: Config, check_data: bool = True) -> None:
    """Each section's own checks, then those that span sections or look at the disk."""
    for section in dataclasses.fields(cfg):
        getattr(cfg, section.name).validate(f"{section.name}.")
    if cfg.checkpoint.best_by == "val_ema" and not cfg.optim.ema_decay:
        raise ConfigError("checkpoint.best_by: val_ema needs optim.ema_decay > 0")
    sections = [f"{s.name}.*" for s in dataclasses.fields(cfg)]
    for key in cfg.train.allow_changes:  # keys or whole sections (`check_resume`)
        if key not in sections and key not in (keys := list(key_fields())):
            raise ConfigError(f"train.allow_changes: {_unknown(key, keys)}")
    if check_data and cfg.data.loader != "synthetic":
        if not cfg.data.root:
            raise ConfigError("data.root: not set; pass data.root=/path/to/imagenet (a folder with train/ and val/)")
        packed = (Path(cfg.data.root) / "index.json").is_file()  # written by `python -m data.pack`
        for split in () if packed else ("train", "val"):
            path = Path(cfg.data.root) / split
            if not path.is_dir():
                raise ConfigError(f"data.root: '{path}' does not exist (expected <root>/{split}/<class>/<image>)")


def _safe_yaml(stream, where: str) -> Any:
    """yaml.safe_load (no tag ever constructs an object); a YAML error, such as a
    `!!python/object/apply` tag, is one ConfigError line naming the file (or override)."""
    try:
        return yaml.safe_load(stream)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not plain YAML ({getattr(e, 'problem', None) or e})") from None


def load(path: str | None, overrides: list[str] = (), check_data: bool = True) -> Config:
    """Build the Config from a YAML recipe and `section.key=value` overrides, then validate it."""
    cfg = Config()
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"--config: file '{path}' not found")
        with open(path) as f:
            values = _safe_yaml(f, f"--config: '{path}'") or {}
        if not isinstance(values, dict):
            raise ConfigError(f"--config: '{path}' must hold a mapping of sections")
        _merge(cfg, values)
    for arg in overrides:
        _merge(cfg, parse_override(arg, cfg))
    if not cfg.log.name:
        cfg.log.name = Path(path).stem if path else "run"
    validate(cfg, check_data=check_data)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
    cfg = Config()
    _merge(cfg, values)
    return cfg


def save(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(_plain(to_dict(cfg)), f, sort_keys=False)


def _plain(value: Any) -> Any:
    """Tuples → lists so the YAML is readable without Python tags."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- the recipe across world sizes: the global batch split over the ranks, what a resume may change --

class BatchSplit(NamedTuple):
    """How one optimizer step's samples are cut: per rank, in micro-batches."""

    batch: int  # per rank and micro-batch
    accumulate: int  # micro-batches per optimizer step
    global_batch: int  # samples per optimizer step, all ranks

    def describe(self, world: int) -> str:
        return f"global batch {self.global_batch} = {world} ranks x {self.batch} x {self.accumulate} micro-batches"


def split_batch(data: DataConfig, optim: OptimConfig, world: int) -> BatchSplit:
    """`data.global_batch` over `world` ranks: per rank global_batch / world, in `optim.accumulate`
    equal micro-batches if that is set (> 1), else in the fewest equal micro-batches of at most
    `data.batch_size`. Unset: data.batch_size x world x optim.accumulate."""
    if not data.global_batch:
        return BatchSplit(data.batch_size, optim.accumulate, data.batch_size * world * optim.accumulate)
    gb = data.global_batch
    if gb % world:
        raise ConfigError(f"data.global_batch: {gb} does not split over {world} ranks "
                          f"(it must be a multiple of the world size)")
    per_rank = gb // world
    if optim.accumulate > 1:
        if per_rank % optim.accumulate:
            raise ConfigError(f"data.global_batch: {gb} / {world} ranks = {per_rank} per rank does not split "
                              f"into optim.accumulate={optim.accumulate} equal micro-batches")
        return BatchSplit(per_rank // optim.accumulate, optim.accumulate, gb)
    k = next(k for k in range(1, per_rank + 1) if per_rank % k == 0 and per_rank // k <= data.batch_size)
    return BatchSplit(per_rank // k, k, gb)


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; tuples as lists (as the JSON a checkpoint holds)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _global_batch(flat: dict[str, Any], world: int | None) -> int | None:
    """The samples per optimizer step a flat config means on `world` ranks (None: not known)."""
    if flat["data.global_batch"]:
        return flat["data.global_batch"]
    return None if world is None else flat["data.batch_size"] * world * flat["optim.accumulate"]


def compare(old: dict, new: Config, world: int, old_world: int | None) -> tuple[list[str], list[str]]:
    """(refused, logged): "key: old -> new" for each key that `new` changes in `old`, the nested
    config dict a checkpoint saved on `old_world` ranks (None: unknown); a key added since takes
    its default. By the key's resume policy: split keys pass while the global batch is kept (2 x 12
    -> 1 x 24), rate keys while optim.lr / optim.lr_reference_batch is kept, recipe keys only if
    new train.allow_changes names them. A world size that changes alone, without data.global_batch,
    changes no key: the peak LR follows the linear rule and the trainer logs it."""
    fields = key_fields()
    a_all, b_all = {**flatten(to_dict(Config())), **flatten(old)}, flatten(to_dict(new))
    gb = _global_batch(a_all, old_world), _global_batch(b_all, world)
    rate = [c["optim.lr"] / c["optim.lr_reference_batch"] for c in (a_all, b_all)]
    kept = {"free": True, "recipe": False, "split": gb[0] == gb[1], "rate": math.isclose(*rate, rel_tol=1e-12)}
    allowed = new.train.allow_changes
    refused, logged = [], []
    for key in sorted(set(a_all) | set(b_all)):
        a, b = a_all.get(key, "<absent>"), b_all.get(key, "<absent>")
        if a == b:
            continue
        policy = fields[key].metadata.get("resume", "recipe") if key in fields else "recipe"  # a removed key
        change = f"{key}: {a!r} -> {b!r}"
        if kept[policy] or any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in allowed):
            logged.append(change)
        else:
            refused.append(change + (f" (global batch {gb[0] or '?'} -> {gb[1]})"
                                     if policy == "split" and (a, b) != gb else ""))
    return refused, logged


def check_resume(old: dict, new: Config, world: int, old_world: int | None, where: str) -> list[str]:
    """Raise ConfigError (one line) on a refused change (`compare`); return the allowed ones for the log."""
    refused, logged = compare(old, new, world, old_world)
    if refused:
        keys = ",".join(c.split(":", 1)[0] for c in refused)
        raise ConfigError(f"resume from {where} would change the recipe: {'; '.join(refused)}; "
                          f"start a new run (log.name=...) or allow it with train.allow_changes=[{keys}]")
    return logged
