"""Config errors: one line naming the key, non-zero exit, and no process group created."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from train import config as C

ROOT = Path(__file__).resolve().parent.parent


def load(*overrides, path=None, data=True):
    return C.load(path, list(overrides), check_data=data)


def test_overrides_typed(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    cfg = load("optim.lr=0.4", "data.batch_size=64", f"data.root={tmp_path}", "schedule.milestones=[1,2]",
               "model.channels_last=false", "log.name=007")
    assert cfg.optim.lr == 0.4 and cfg.data.batch_size == 64 and cfg.schedule.milestones == [1, 2]
    assert cfg.model.channels_last is False and cfg.log.name == "007"
    assert isinstance(cfg.optim.lr, float)


def test_yaml_and_roundtrip(tmp_path):
    cfg = load("data.loader=synthetic", path=str(ROOT / "configs/imagenet_resnet50.yaml"))
    C.save(cfg, tmp_path / "c.yaml")
    again = C.load(str(tmp_path / "c.yaml"), [], check_data=False)
    assert C.to_dict(again) == C.to_dict(cfg)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'; did you mean 'optim.lr'?"),
    ("optim.lr=-0.1", "optim.lr: must be > 0, got -0.1"),  # one check, one message
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("data.batch_size=2.5", "data.batch_size: expected an integer, got 2.5"),
    ("data.batch_size=0", "data.batch_size: must be > 0, got 0"),
    ("train.amp=fp8", "train.amp: 'fp8' is not one of auto, off, bf16, fp16"),
    ("model.channels_last=maybe", "model.channels_last: expected true or false, got 'maybe'"),
    ("data.root=/nonexistent", "data.root: '/nonexistent/train' does not exist"),
    ("trian.epochs=3", "unknown config key 'trian.epochs'; did you mean 'train.epochs'?"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(C.ConfigError) as e:
        load(override)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_missing_root_and_file():
    with pytest.raises(C.ConfigError, match="data.root: not set"):
        load()
    with pytest.raises(C.ConfigError, match="--config: file 'nope.yaml' not found"):
        C.load("nope.yaml", [])


def test_unknown_yaml_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  momentun: 0.9\n")
    with pytest.raises(C.ConfigError, match="unknown config key 'optim.momentun'; did you mean 'optim.momentum'"):
        C.load(str(p), [], check_data=False)


def test_torchrun_exits_before_process_group(tmp_path):
    """A bad key under torchrun: exit 2 on every rank, one-line message, no rendezvous/group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train/main.py", "--config", "configs/fashion_mnist_resnet.yaml", "optim.lrr=0.1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("config error:")]
    assert lines == ["config error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"] * 2
    frames = [x for x in r.stderr.splitlines() if x.strip().startswith("File ")]
    assert not [f for f in frames if "/train/" in f or "/data/" in f]  # no traceback from our code
    assert "init_process_group" not in r.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path, tmp_path):
    """Each recipe parses, type-checks and validates (its data root replaced by an empty layout)."""
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    cfg = load(f"data.root={tmp_path}", path=str(path))
    assert cfg.log.name == path.stem and cfg.train.epochs > 0


def test_choices_live_on_the_fields():
    """A Literal field is checked where it is read (YAML, override, from_dict) and YAML 1.1's off stays 'off'."""
    assert load("train.amp=off", "log.progress=off", data=False).train.amp == "off"
    assert C.from_dict({"train": {"amp": False}}).train.amp == "off"
    with pytest.raises(C.ConfigError, match="^model.shortcut: 'D' is not one of auto, A, B, C$"):
        C.from_dict({"model": {"shortcut": "D"}})
    cfg = C.Config()
    cfg.dist.backend = "mpi"  # set in code, bypassing the parser
    with pytest.raises(C.ConfigError, match="^dist.backend: 'mpi' is not one of auto, nccl, gloo$"):
        C.validate(cfg, check_data=False)


def test_each_section_validates_itself():
    """A section checks its own values under whatever prefix it is given."""
    with pytest.raises(C.ConfigError, match=r"^data.val_resize: 200 is smaller than data.val_crop 224$"):
        C.DataConfig(val_resize=200).validate("data.")
    with pytest.raises(C.ConfigError, match=r"^ckpt.keep: must be >= 1, got 0$"):
        C.CheckpointConfig(keep=0).validate("ckpt.")
    with pytest.raises(C.ConfigError, match=r"^optim.lr: must be > 0, got 0.0$"):
        load("optim.lr=0", data=False)
    C.Config().train.validate("train.")  # the defaults pass


def undeclared(section: type) -> list[str]:
    """The fields of `section` declared without `knob`: no resume policy, or a number with no range check."""
    hints = typing.get_type_hints(section)
    return [f.name for f in dataclasses.fields(section)
            if f.metadata.get("resume") not in typing.get_args(C.Resume) or "check" not in f.metadata
            or (hints[f.name] in (int, float) and not isinstance(f.metadata["check"], C.Rule))]


def test_every_key_declares_its_resume_policy_and_check():
    """A key is one `knob(default, resume=..., check=...)` edit: a field added without it fails here."""
    sections = {s.name: type(getattr(C.Config(), s.name)) for s in dataclasses.fields(C.Config)}
    assert {name: undeclared(section) for name, section in sections.items()} == {name: [] for name in sections}

    @dataclasses.dataclass
    class NewSection(C.Section):
        ok: int = C.knob(1, resume="free", check=C.positive)
        bare: int = 3
        unchecked: float = C.knob(0.5, resume="recipe")
        flag: bool = C.knob(False, resume="free")

    assert undeclared(NewSection) == ["bare", "unchecked"]


def test_every_range_check_runs_with_the_key_in_its_message():
    """Each numeric key's own rule refuses a value outside it, through the generic `Section.validate`."""
    for key, f in C.key_fields().items():
        if (rule := f.metadata["check"]) is None:
            continue
        cfg, (section, name) = C.Config(), key.split(".")
        bad = next(v for v in (-1, 0, 31, 1.5) if not rule.test(v))
        setattr(getattr(cfg, section), name, bad)
        with pytest.raises(C.ConfigError) as e:
            C.validate(cfg, check_data=False)
        assert str(e.value) == f"{key}: {rule.says}, got {bad}"
