"""Typed run configuration: YAML recipe + dotted CLI overrides, validated before any process group.

A key is declared in one place: its field, with its type (a ``Literal`` lists the allowed
values) and its section's ``validate`` holding its range checks. Every user mistake becomes an
error of one line that names the key. What the config alone can tell (unknown key,
wrong type, impossible value, missing data root) is raised by ``load`` on every rank before
distributed init, so a bad command never leaves a half-started job behind; what needs the
device or the files (fp16 without CUDA, unreadable weights, missing class folders, a dataset
smaller than one global batch) is found after start-up, as a ``ConfigError`` or the data
package's ``DataError``, and ``train/main.py`` prints it as one line and exits 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user error in the config: the message is one line that names the key."""


class Section:
    """A config section: its fields, and `validate` for the checks that need only its own values."""

    def validate(self, prefix: str) -> None:
        """Raise ConfigError for an impossible value; `prefix` is the section's key, e.g. 'data.'."""

    def _positive(self, prefix: str, *names: str) -> None:
        for name in names:
            if (value := getattr(self, name)) <= 0:
                raise ConfigError(f"{prefix}{name}: must be > 0, got {value}")

    def _non_negative(self, prefix: str, *names: str) -> None:
        for name in names:
            if (value := getattr(self, name)) < 0:
                raise ConfigError(f"{prefix}{name}: must be >= 0, got {value}")


@dataclass
class DataConfig(Section):
    root: str = ""  # ImageNet-style folder with train/<class>/*.JPEG and val/<class>/*.JPEG, or a data.pack output
    # node-local disk ($SLURM_TMPDIR, /local/scratch) to copy data.root to at start (data/stage.py): one
    # copy per node, reused after a requeue; "" = read data.root in place
    stage_dir: str = ""
    loader: Literal["torch", "dali", "synthetic"] = "torch"
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"  # auto: gpu if CUDA
    batch_size: int = 256  # per rank; with global_batch: the largest micro-batch per rank
    # the recipe's global batch (samples per optimizer step); the per-rank batch and optim.accumulate
    # are derived from it and the world size (train/recipe.py), so the recipe survives a world-size
    # change; 0 = off: global batch = batch_size x world size x optim.accumulate
    global_batch: int = 0
    val_batch_size: int = 0  # per rank; 0 = batch_size
    workers: int = 8  # decode processes (torch) or threads (DALI) per rank
    train_crop: int = 224
    val_resize: int = 256  # shorter side before the center crop
    val_crop: int = 224
    crop: Literal["random_resized", "pad"] = "random_resized"  # pad: pad + random crop (CIFAR)
    pad: int = 4  # pixels of zero padding for crop=pad
    min_scale: float = 0.08  # RandomResizedCrop lower area bound
    # progressive resizing (FFCV): train at `progressive_min_crop` until `progressive_start_epoch`,
    # then rise linearly (in steps of 32 px) to `train_crop` at `progressive_end_epoch`; 0 = off
    progressive_min_crop: int = 0
    progressive_start_epoch: int = 0
    progressive_end_epoch: int = 0
    hflip: bool = True
    # after crop and flip, on both loaders (data/augment.py): torchvision v2 / nvidia.dali.auto_aug
    auto_augment: Literal["none", "trivial_augment", "rand_augment"] = "none"  # TrivialAugmentWide | RandAugment
    rand_augment_n: int = 2  # RandAugment: ops per image (torchvision's default)
    rand_augment_m: int = 9  # RandAugment: magnitude bin, 0..30 (torchvision's default)
    random_erasing: float = 0.0  # probability of v2.RandomErasing (value 0 on the normalised image); 0 = off
    # repeated augmentation (DeiT/torchvision RASampler, data/sampler.py): each image k times an epoch on
    # different ranks, differently augmented; the epoch stays ~n samples (n // 256 * 256); 1 = off
    repeated_aug: int = 1
    # MixUp / CutMix on the device after the loader, on every loader (data/mix.py): Beta(alpha, alpha)
    # mixing weights; 0 = off. The train loss sees soft targets; validation is never mixed.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # probability that a batch is mixed at all (timm's mixup_prob)
    mix_switch_prob: float = 0.5  # with both alphas > 0: probability of CutMix instead of MixUp (timm's)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    num_classes: int = 0  # 0 = count the class folders
    classes: list[str] = field(default_factory=list)  # subset of class folders; [] = all
    pin_memory: bool = True
    synthetic_samples: int = 1281167  # epoch length of data.loader=synthetic (ImageNet's)

    def validate(self, prefix: str) -> None:
        self._positive(prefix, "batch_size", "train_crop", "val_crop", "repeated_aug")
        self._non_negative(prefix, "global_batch")
        self._non_negative(prefix, "mixup_alpha", "cutmix_alpha")
        for name in ("mix_prob", "mix_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{prefix}{name}: must be a probability in [0, 1], got {getattr(self, name)}")
        self._non_negative(prefix, "workers", "val_batch_size", "pad")
        if self.progressive_min_crop and not (
                0 < self.progressive_min_crop <= self.train_crop
                and 0 <= self.progressive_start_epoch <= self.progressive_end_epoch):
            raise ConfigError(f"{prefix}progressive_min_crop: needs 0 < progressive_min_crop <= train_crop "
                              "and progressive_start_epoch <= progressive_end_epoch")
        if not 0 < self.min_scale <= 1:
            raise ConfigError(f"{prefix}min_scale: must be in (0, 1], got {self.min_scale}")
        if not 0 <= self.random_erasing <= 1:
            raise ConfigError(f"{prefix}random_erasing: must be a probability in [0, 1], got {self.random_erasing}")
        self._positive(prefix, "rand_augment_n")
        if not 0 <= self.rand_augment_m <= 30:
            raise ConfigError(f"{prefix}rand_augment_m: must be a magnitude bin in 0..30, got {self.rand_augment_m}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError(f"{prefix}mean/{prefix}std: need the same length and positive std")
        if self.val_resize < self.val_crop:
            raise ConfigError(f"{prefix}val_resize: {self.val_resize} is smaller than "
                              f"{prefix}val_crop {self.val_crop}")


@dataclass
class ModelConfig(Section):
    name: str = "resnet50"
    zero_init_residual: bool = True
    stem: Literal["auto", "imagenet", "cifar"] = "auto"  # imagenet: 7x7/2 + max-pool; cifar: 3x3/1
    shortcut: Literal["auto", "A", "B", "C"] = "auto"
    stride_in_1x1: bool = False  # True = the paper's ResNet v1, False = v1.5 (torchvision)
    se: bool = False  # squeeze-and-excitation (Hu et al. 2018) in every block; the seresnet* names imply it
    weights: str = ""  # local .pth (torchvision state_dict or project export)
    freeze_stages: int = 0
    new_classifier: bool = False  # with weights: re-initialise fc (transfer to other classes)
    channels_last: bool = True
    sync_bn: bool = True  # only when world_size > 1
    compile: bool = False

    def validate(self, prefix: str) -> None:
        self._non_negative(prefix, "freeze_stages")


@dataclass
class OptimConfig(Section):
    name: Literal["sgd", "lars", "lamb"] = "sgd"  # lars, lamb: timm.optim's (train/optim.py)
    lr: float = 0.1  # per `lr_reference_batch` images; scaled linearly with the global batch
    lr_reference_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    bn_weight_decay: bool = False  # False: no decay on norm-layer parameters (and biases, unless bias_weight_decay)
    bias_weight_decay: Literal["as_bn", "on", "off"] = "as_bn"  # the other biases (fc, SE); as_bn: as bn_weight_decay
    label_smoothing: float = 0.0
    # training loss (train/optim.py): ce = softmax cross-entropy; bce = binary cross-entropy per class
    # on the (soft) targets, as timm's BinaryCrossEntropy in "ResNet strikes back"
    loss: Literal["ce", "bce"] = "ce"
    bce_target_threshold: float = 0.0  # bce: targets above it -> 1, the rest -> 0 (timm --bce-target-thresh); 0 = off
    bce_sum: bool = False  # bce: sum over classes, mean over batch (timm --bce-sum); False: mean of both (timm)
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    # micro-batches per optimizer step (gradient accumulation, DDP no_sync on all but the last);
    # with data.global_batch: must split the per-rank batch, or 1 = derive it from data.batch_size
    accumulate: int = 1
    # weight EMA (train/optim.py, torch.optim.swa_utils.AveragedModel): decay per optimizer step, 0 = off;
    # updated every `ema_every` steps with decay ** ema_every; evaluated as val_ema/*, saved as "ema"
    ema_decay: float = 0.0
    ema_every: int = 1
    implementation: Literal["foreach", "fused", "for-loop"] = "foreach"

    def validate(self, prefix: str) -> None:
        self._positive(prefix, "lr_reference_batch", "ema_every")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{prefix}ema_decay: must be in [0, 1) (0 = off), got {self.ema_decay}")
        self._non_negative(prefix, "lr", "weight_decay", "momentum", "grad_clip")
        self._positive(prefix, "accumulate")
        if self.lr == 0:
            raise ConfigError(f"{prefix}lr: must be > 0, got 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{prefix}label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.bce_target_threshold < 1:
            raise ConfigError(f"{prefix}bce_target_threshold: must be in [0, 1), got {self.bce_target_threshold}")
        if self.implementation == "fused" and self.name != "sgd":
            raise ConfigError(f"{prefix}implementation: fused is for sgd only; {self.name} takes foreach or for-loop")


@dataclass
class ScheduleConfig(Section):
    name: Literal["cosine", "step", "multistep", "poly", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    step_size: int = 30  # epochs, for step
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])  # epochs, for multistep
    gamma: float = 0.1
    min_lr_factor: float = 0.0  # cosine and poly end at lr * min_lr_factor
    power: float = 2.0  # poly: (1 - progress) ** power, as MLPerf's LARS recipes

    def validate(self, prefix: str) -> None:
        self._non_negative(prefix, "warmup_epochs")


@dataclass
class TrainConfig(Section):
    epochs: int = 90
    # auto: from the hardware (train/hardware.py): bf16 on sm >= 8.0, else fp16; on the CPU bf16
    # only where it is native (AMX/AVX512-BF16) and a probe finds it faster, else fp32 ("off")
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    seed: int = 0
    deterministic: bool = False
    eval_every: int = 1  # epochs
    eval_hflip: bool = False  # evaluate on the mean logits of each image and its mirror (flip TTA)
    max_steps: int = 0  # stop after this many global steps (tests, benchmarks); 0 = off
    resume: str = "auto"  # auto (latest in run dir) | off | path to a checkpoint dir
    # recipe keys a resume may change (train/recipe.py), e.g. [optim.lr, schedule.*]; others stop it
    allow_changes: list[str] = field(default_factory=list)

    def validate(self, prefix: str) -> None:
        self._positive(prefix, "epochs", "eval_every")
        self._non_negative(prefix, "max_steps")


@dataclass
class LogConfig(Section):
    dir: str = "runs"
    name: str = ""  # run directory is <dir>/<name>; "" = the config file's stem
    every: int = 50  # steps between reduced metrics (the only host sync)
    tensorboard: bool = True
    progress: Literal["auto", "bar", "lines", "off"] = "auto"  # auto: a bar on a terminal, else lines
    grad_norm_every: int = 50  # steps between per-stage gradient and weight norms; 0 = off
    histograms: bool = False  # weight and gradient histograms every epoch
    images: bool = True  # a grid of augmented training inputs at the start
    feature_maps: bool = True  # stage activations of a fixed validation image at every evaluation
    graph: bool = True  # the model graph (traced once on a CPU copy)

    def validate(self, prefix: str) -> None:
        self._positive(prefix, "every")
        self._non_negative(prefix, "grad_norm_every")


@dataclass
class CheckpointConfig(Section):
    every_epochs: int = 1
    every_steps: int = 0
    keep: int = 3
    keep_best: bool = True
    best_by: Literal["val", "val_ema"] = "val"  # best.json: the model's val top-1 or the EMA's (optim.ema_decay)
    async_save: bool = True

    def validate(self, prefix: str) -> None:
        self._non_negative(prefix, "every_epochs", "every_steps")
        if self.keep < 1:
            raise ConfigError(f"{prefix}keep: must be >= 1, got {self.keep}")


@dataclass
class DistConfig(Section):
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    device: Literal["auto", "cuda", "cpu"] = "auto"
    timeout_s: int = 1800
    bucket_cap_mb: int = 25
    gradient_as_bucket_view: bool = True
    static_graph: bool = False
    cpu_threads: int = 0  # intra-op threads per rank; 0 = its share of the node's CPUs (less loader workers)

    def validate(self, prefix: str) -> None:
        self._non_negative(prefix, "cpu_threads")


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


def _all_keys(cfg: Config) -> list[str]:
    keys = []
    for section in dataclasses.fields(cfg):
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(getattr(cfg, section.name))]
    return keys


def parse_override(arg: str, cfg: Config) -> dict:
    """`optim.lr=0.4` → {"optim": {"lr": 0.4}}; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in arg:
        raise ConfigError(f"override '{arg}' is not of the form section.key=value")
    key, raw = arg.split("=", 1)
    if key not in _all_keys(cfg):
        raise _unknown(key, _all_keys(cfg))
    value = yaml.safe_load(raw) if raw != "" else ""
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
        obj, prefix = getattr(cfg, section.name), f"{section.name}."
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):  # choices again: a Config built in code skips _merge
            if typing.get_origin(hints[f.name]) is Literal:
                _coerce(f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name])
        obj.validate(prefix)
    if cfg.checkpoint.best_by == "val_ema" and not cfg.optim.ema_decay:
        raise ConfigError("checkpoint.best_by: val_ema needs optim.ema_decay > 0")
    sections = [f"{s.name}.*" for s in dataclasses.fields(cfg)]
    for key in cfg.train.allow_changes:  # keys or whole sections (train/recipe.py)
        if key not in sections and key not in _all_keys(cfg):
            raise ConfigError(f"train.allow_changes: {_unknown(key, _all_keys(cfg))}")
    if check_data and cfg.data.loader != "synthetic":
        if not cfg.data.root:
            raise ConfigError("data.root: not set; pass data.root=/path/to/imagenet (a folder with train/ and val/)")
        packed = (Path(cfg.data.root) / "index.json").is_file()  # written by `python -m data.pack`
        for split in () if packed else ("train", "val"):
            path = Path(cfg.data.root) / split
            if not path.is_dir():
                raise ConfigError(f"data.root: '{path}' does not exist (expected <root>/{split}/<class>/<image>)")


def load(path: str | None, overrides: list[str] = (), check_data: bool = True) -> Config:
    """Build the Config from a YAML recipe and `section.key=value` overrides, then validate it."""
    cfg = Config()
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"--config: file '{path}' not found")
        with open(path) as f:
            values = yaml.safe_load(f) or {}
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

