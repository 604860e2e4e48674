"""The fast path chosen from the machine: autocast dtype on CPU (native bf16 + probe) and CUDA
(compute capability), threads per rank. Probe timings are injected, so both answers are tested
on whatever CPU runs the tests."""

from __future__ import annotations

import json

import pytest
import torch

from train import hardware
from train.config import ConfigError
from train.hardware import CpuInfo

CPU = torch.device("cpu")
AMX = CpuInfo("Intel Xeon (AMX)", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}), "AVX512", 2)
EPYC = CpuInfo("AMD EPYC 7B13 (Zen 3)", frozenset({"avx2", "fma"}), "AVX2", 2)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


def no_probe():
    raise AssertionError("the probe must not run")


def test_without_native_bf16_auto_never_picks_bf16():
    assert not EPYC.native_bf16
    # even a probe claiming bf16 is 10x faster is not consulted: emulated bf16 is never native
    assert hardware.cpu_amp(EPYC, {"off": 1.0, "bf16": 0.1})[0] == "off"
    amp, why = hardware.choose_amp("auto", CPU, measure=no_probe, key="k", cpu=EPYC)
    assert amp == "off" and "emulated" in why and "AMD EPYC" in why


def test_native_bf16_follows_the_probe_both_ways():
    assert AMX.native_bf16
    amp, why = hardware.choose_amp("auto", CPU, measure=lambda: {"off": 0.25, "bf16": 0.125}, key="a", cpu=AMX)
    assert amp == "bf16" and "2.00x faster" in why and "250 ms" in why
    amp, why = hardware.choose_amp("auto", CPU, measure=lambda: {"off": 0.20, "bf16": 0.198}, key="b", cpu=AMX)
    assert amp == "off" and "not faster" in why  # within the 5 % margin: the exact dtype wins


def test_probe_result_is_cached_per_cpu_and_key():
    calls = []

    def measure():
        calls.append(1)
        return {"off": 0.3, "bf16": 0.1}

    for _ in range(2):
        amp, why = hardware.choose_amp("auto", CPU, measure=measure, key="resnet20|batch 64", cpu=AMX)
        assert amp == "bf16"
    assert len(calls) == 1 and "cached in" in why
    cached = json.loads(hardware.cache_path().read_text())
    assert list(cached) == [f"{AMX.model}|AVX512|torch {torch.__version__}|resnet20|batch 64"]
    hardware.choose_amp("auto", CPU, measure=measure, key="resnet50|batch 64", cpu=AMX)
    assert len(calls) == 2  # another model is another measurement


def test_ranks_agree_on_the_mean_of_their_timings():
    # this rank saw bf16 slower, the mean over ranks (injected `reduce`) says faster: all follow it
    amp, _ = hardware.choose_amp("auto", CPU, measure=lambda: {"off": 0.2, "bf16": 0.3}, key="r", cpu=AMX,
                                 reduce=lambda v: [0.2, 0.1])
    assert amp == "bf16"


def test_isa_caps_hide_native_bf16(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not AMX.native_bf16 and "capped" in AMX.describe()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert AMX.native_bf16
    assert not CpuInfo(AMX.model, AMX.flags, "AVX2", 2).native_bf16  # ATEN_CPU_CAPABILITY=avx2


def test_explicit_choices_and_user_errors():
    assert hardware.choose_amp("off", CPU, measure=no_probe, key="k", cpu=AMX)[0] == "off"
    assert hardware.choose_amp("bf16", CPU, measure=no_probe, key="k", cpu=EPYC)[0] == "bf16"  # warned, kept
    with pytest.raises(ConfigError, match=r"^train.amp: fp16 needs a CUDA GPU"):
        hardware.choose_amp("fp16", CPU, measure=no_probe, key="k", cpu=AMX)


@pytest.mark.parametrize("capability, amp", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                             ((8, 9), "bf16"), ((9, 0), "bf16")])
def test_cuda_decision_by_compute_capability(capability, amp):
    assert hardware.cuda_amp(capability)[0] == amp  # V100, T4 | A100, L4, H100


def test_threads_are_the_rank_share_less_loader_workers():
    assert hardware.cpu_threads(0, cpus=2, sharing=2, loader_workers=0) == 1  # the demo: 2 ranks, 2 cores
    assert hardware.cpu_threads(0, cpus=2, sharing=1, loader_workers=0) == 2
    assert hardware.cpu_threads(0, cpus=96, sharing=8, loader_workers=8) == 4  # 8 GPUs, 8 decode workers each
    assert hardware.cpu_threads(0, cpus=12, sharing=1, loader_workers=8) == 4  # bound to its own 12 CPUs
    assert hardware.cpu_threads(0, cpus=4, sharing=4, loader_workers=2) == 1  # never 0
    assert hardware.cpu_threads(3, cpus=64, sharing=1, loader_workers=0) == 3  # dist.cpu_threads wins


def test_probe_times_both_dtypes_and_leaves_the_model_alone():
    from train.config import ModelConfig
    from train.models import build

    model = build(ModelConfig(name="resnet20", stem="cifar"), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = hardware.probe(model, batch=4, crop=16, channels_last=True, repeats=1)
    assert set(t) == {"off", "bf16"} and all(v > 0 for v in t.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched
    assert all(p.grad is None for p in model.parameters())
