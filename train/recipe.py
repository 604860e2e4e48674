"""The recipe across world sizes: how the global batch is split, and what a resume may change.

`split_batch` turns `data.global_batch` (or, unset, `data.batch_size` x world x `optim.accumulate`)
into the per-rank micro-batch and the number of micro-batches per optimizer step.

`compare` checks the config saved in a checkpoint against the new one. Recipe keys (the model,
optimiser, schedule, epochs, seed, data and augmentation) stop the resume unless named in
`train.allow_changes` (a key or `section.*`); the keys below only change how fast or where the same
recipe runs and are logged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from train.config import ConfigError

# Keys a resume may change freely (whole sections end in ".").
MAY_CHANGE = ("log.", "checkpoint.", "dist.", "data.workers", "data.loader", "data.dali_device", "data.stage_dir",
              "data.pin_memory", "data.val_batch_size", "data.synthetic_samples", "train.resume",
              "train.max_steps", "train.eval_every", "train.eval_hflip", "train.amp", "train.deterministic",
              "train.allow_changes", "model.compile", "model.channels_last", "optim.implementation")
# May change only while data.global_batch is set and kept: they split the same global batch.
SPLIT_KEYS = ("data.batch_size", "optim.accumulate")


class Split(NamedTuple):
    batch: int  # per rank and micro-batch
    accumulate: int  # micro-batches per optimizer step
    global_batch: int  # samples per optimizer step, all ranks

    def describe(self, world: int) -> str:
        return f"global batch {self.global_batch} = {world} ranks x {self.batch} x {self.accumulate} micro-batches"


def split_batch(data, optim, world: int) -> Split:
    """`data.global_batch` over `world` ranks: per rank global_batch / world, in `optim.accumulate`
    equal micro-batches if that is set (> 1), else in the fewest equal micro-batches of at most
    `data.batch_size`. Unset: data.batch_size x world x optim.accumulate."""
    if not data.global_batch:
        return Split(data.batch_size, optim.accumulate, data.batch_size * world * optim.accumulate)
    gb = data.global_batch
    if gb % world:
        raise ConfigError(f"data.global_batch: {gb} does not split over {world} ranks "
                          f"(it must be a multiple of the world size)")
    per_rank = gb // world
    if optim.accumulate > 1:
        if per_rank % optim.accumulate:
            raise ConfigError(f"data.global_batch: {gb} / {world} ranks = {per_rank} per rank does not split "
                              f"into optim.accumulate={optim.accumulate} equal micro-batches")
        return Split(per_rank // optim.accumulate, optim.accumulate, gb)
    k = next(k for k in range(1, per_rank + 1) if per_rank % k == 0 and per_rank // k <= data.batch_size)
    return Split(per_rank // k, k, gb)


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) or (p.endswith(".*") and key.startswith(p[:-1]))
               for p in patterns)


_ABSENT = "<absent>"


def compare(old: dict, new: dict, defaults: dict | None = None) -> tuple[list[str], list[str]]:
    """(refused, logged): "key: old -> new" for each changed key of the nested config dicts
    `old` (saved) and `new`; a key absent on one side takes its value from `defaults` (a key added
    since the checkpoint was written). Refused: recipe keys not in new train.allow_changes."""
    old, new, defaults = flatten(old), flatten(new), flatten(defaults or {})
    allowed = list(new.get("train.allow_changes") or [])
    keep_global = bool(new.get("data.global_batch")) and old.get("data.global_batch") == new.get("data.global_batch")
    refused, logged = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, defaults.get(key, _ABSENT)), new.get(key, defaults.get(key, _ABSENT))
        a, b = (list(x) if isinstance(x, tuple) else x for x in (a, b))
        if a == b:
            continue
        change = f"{key}: {a!r} -> {b!r}"
        free = _matches(key, MAY_CHANGE) or (keep_global and key in SPLIT_KEYS)
        (logged if free or _matches(key, allowed) else refused).append(change)
    return refused, logged


def check_resume(old: dict, new: dict, defaults: dict, where: str) -> list[str]:
    """Raise ConfigError (one line) on a refused change; return the allowed ones for the log."""
    refused, logged = compare(old, new, defaults)
    if refused:
        keys = ",".join(c.split(":", 1)[0] for c in refused)
        raise ConfigError(f"resume from {where} would change the recipe: {'; '.join(refused)}; "
                          f"start a new run (log.name=...) or allow it with train.allow_changes=[{keys}]")
    return logged
