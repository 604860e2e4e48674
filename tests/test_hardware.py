"""The fast path chosen from the machine: autocast dtype on CPU (native bf16 + probe) and CUDA
(compute capability), threads per rank. Probe timings are injected, so both answers are tested
on whatever CPU runs the tests."""

from __future__ import annotations

import json
import os

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


def test_share_of_the_cpus_and_the_gpu_rule():
    assert hardware.cpu_share(2, 2) == 1  # the demo: 2 ranks, 2 cores
    assert hardware.cpu_share(2, 1) == 2
    assert hardware.cpu_share(96, 8) == 12
    assert hardware.cpu_share(2, 4) == 1  # never 0
    assert hardware.accelerator_threads(12, 8) == 4  # 8 GPUs on 96 CPUs, 8 decode workers each
    assert hardware.accelerator_threads(4, 8) == 1


# probe timings as measured on the 2-core Xeon (docs/cpu.md), injected
RESNET18_FP32 = {1: 3.30, 2: 1.66}  # s per forward/backward, batch 32, 224 px; decode 1.3 ms/image
RESNET20_32PX = {1: 0.204, 2: 0.131}  # batch 128, bf16; decode 0.87 ms/image


def test_compute_bound_step_takes_all_cores_beside_idle_workers():
    threads, why = hardware.split_threads(2, 2, RESNET18_FP32, decode=32 * 0.0013)
    assert threads == 2
    assert why == ("all 2 CPUs compute beside 2 mostly idle decode workers (probe: 1 thread 3300 ms, 2 threads "
                   "1660 ms per forward/backward; decode 42 ms per batch per worker, 1% of a step on 2 cores)")


def test_decode_heavy_step_leaves_cores_to_the_workers():
    threads, why = hardware.split_threads(2, 2, RESNET20_32PX, decode=128 * 0.00087)
    assert threads == 1
    assert why.startswith("1 of 2 CPUs compute, 1 decode (2 workers), est. 204 ms per step (")
    assert "decode 111 ms per batch per worker, 43% of a step on 2 cores" in why


def test_split_finishes_compute_and_decode_together_on_many_cores():
    # 16 CPUs, 8 workers, compute scales perfectly (1.6 s -> 0.1 s), decode 2.4 s per batch per worker:
    # t threads leave 16 - t cores (at most 8 used); max(1.6 / t, 2.4 / min(8, 16 - t)) is least at t = 8
    threads, why = hardware.split_threads(16, 8, {1: 1.6, 16: 0.1}, decode=2.4)
    assert threads == 8 and why.startswith("8 of 16 CPUs compute, 8 decode (8 workers), est. 300 ms per step")
    # compute-bound there: all 16 threads beside the 8 workers
    assert hardware.split_threads(16, 8, {1: 1.6, 16: 0.1}, decode=0.05)[0] == 16


def test_threads_that_do_not_help_are_not_taken():
    # a loaded machine: 2 threads slower than 1 (the other jobs hold the second core): 1 thread, even
    # though decode is cheap
    assert hardware.split_threads(2, 2, {1: 1.0, 2: 1.2}, decode=0.01)[0] == 1
    assert hardware.split_threads(2, 2, {1: 1.0, 2: 0.9}, decode=0.01)[0] == 1  # 1.11x: within the margin
    assert hardware.split_threads(2, 2, {1: 1.0, 2: 0.7}, decode=0.01)[0] == 2


def test_nothing_to_split():
    assert hardware.split_threads(2, 0, {}, decode=0.0) == (2, "all 2 CPU(s) of the rank's share compute "
                                                                "(no decode workers beside it)")
    assert hardware.split_threads(1, 2, {}, decode=0.0)[0] == 1


class FakeSplit:
    pass


def run_choose(monkeypatch, overrides=(), env=None, step=RESNET20_32PX, decode=0.00087, share=2, loadavg=0.0):
    """hardware.choose on a 2-CPU share with the probes replaced by the given timings; returns
    (threads, number of probe runs, log lines)."""
    from types import SimpleNamespace

    import data.torch_loader
    from train.config import load

    calls = []

    def probe_threads(model, batch, crop, channels_last, amp, counts):
        calls.append(counts)
        return dict(step)

    monkeypatch.setattr(hardware, "probe_threads", probe_threads)
    monkeypatch.setattr(data.torch_loader, "decode_seconds", lambda cfg, split: decode)
    monkeypatch.setattr(hardware, "_share", lambda info: share)
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (loadavg,) * 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    cfg = load(None, ["data.workers=2", "train.amp=off", *overrides], check_data=False)
    info = SimpleNamespace(device=CPU, world_size=1, local_rank=0, local_world_size=1)
    loader = SimpleNamespace(split=FakeSplit())
    before = torch.get_num_threads()
    try:
        _, threads = hardware.choose(cfg, info, torch.nn.Linear(2, 2), 128, loader)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    return threads, len(calls)


def test_choose_probes_once_and_caches(monkeypatch, caplog):
    caplog.set_level("INFO", logger="resnet")
    assert run_choose(monkeypatch) == (1, 1)
    assert run_choose(monkeypatch) == (1, 0)  # cached: no probe
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("threads ")]
    assert lines[0].startswith("threads 1: 1 of 2 CPUs compute, 1 decode (2 workers)")
    assert lines[1].endswith(f"[cached in {hardware.cache_path().with_name('threads.json')}]")
    cached = json.loads(hardware.cache_path().with_name("threads.json").read_text())
    (key,) = cached
    assert "|batch 128|" in key and "|amp off|torch x2|share 2|" in key
    assert cached[key] == {"step_1": 0.204, "step_share": 0.131, "decode": 128 * 0.00087}
    # another regime is another measurement: compute-bound, all cores
    assert run_choose(monkeypatch, ["model.name=resnet18"], step=RESNET18_FP32, decode=0.0013) == (2, 1)


def test_a_probe_on_a_busy_machine_decides_this_run_only(monkeypatch, caplog):
    caplog.set_level("INFO", logger="resnet")
    assert run_choose(monkeypatch, loadavg=50.0) == (1, 1)
    assert caplog.records[-1].getMessage().endswith("[not cached: load average 50.0 on "
                                                    f"{len(os.sched_getaffinity(0))} CPUs]")
    assert run_choose(monkeypatch, loadavg=50.0) == (1, 1)  # measured again
    assert not hardware.cache_path().with_name("threads.json").exists()


def test_the_user_and_the_config_win_without_a_probe(monkeypatch):
    assert run_choose(monkeypatch, ["dist.cpu_threads=2"]) == (2, 0)
    assert run_choose(monkeypatch, env={"OMP_NUM_THREADS": "2"}) == (2, 0)
    assert run_choose(monkeypatch, ["data.workers=0"]) == (2, 0)  # decoding between steps: all cores
    assert run_choose(monkeypatch, share=1) == (1, 0)


def test_probe_times_both_dtypes_and_leaves_the_model_alone():
    from train.config import ModelConfig
    from train.models import build

    model = build(ModelConfig(name="resnet20", stem="cifar"), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = hardware.probe(model, batch=4, crop=16, channels_last=True, repeats=1)
    assert set(t) == {"off", "bf16"} and all(v > 0 for v in t.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics untouched
    assert all(p.grad is None for p in model.parameters())


def test_compile_auto_where_the_planned_steps_repay_it(monkeypatch):
    monkeypatch.setattr(hardware, "c_compiler", lambda: "/usr/bin/g++")
    choice = hardware.compile_choice
    demo_fp32 = 937 * 0.31  # planned steps per rank x probed seconds: the demo in fp32, ~5 min
    assert choice("auto", CPU, "off", demo_fp32) == (
        False, "auto: ~5 min of fp32 compute planned per rank; compiling repays itself from ~44 min (saves >= 18% "
               "of a step, up to 4 min to compile, 2x margin)")
    assert choice("auto", CPU, "off", 36 * 234 * 0.46)[0]  # the 36-epoch recipe in fp32: ~65 min
    assert not choice("auto", CPU, "bf16", 10**6)[0]  # bf16: 0.89-1.29x, not reliably worth it
    assert not choice("auto", torch.device("cuda", 0), "bf16", 10**6)[0]  # GPUs: eager unless asked
    assert choice("on", CPU, "bf16") == (True, "set in the config")
    assert choice(True, CPU, "off")[0] and not choice(False, CPU, "off", 10**6)[0]  # a bool from code
    monkeypatch.setattr(hardware, "c_compiler", lambda: None)
    assert choice("auto", CPU, "off", 10**6) == (False, "auto: no C++ compiler for inductor (install g++ or set CXX)")


def test_maybe_compile_times_a_step_once_and_logs_the_line(monkeypatch, caplog):
    from types import SimpleNamespace

    from train.config import load

    caplog.set_level("INFO", logger="resnet")
    monkeypatch.setattr(hardware, "c_compiler", lambda: "/usr/bin/g++")
    calls = []
    monkeypatch.setattr(hardware, "probe_threads", lambda *a: calls.append(a) or {a[-1][0]: 0.5})
    monkeypatch.setattr(torch, "compile", lambda m: ("compiled", m))
    cfg = load(None, ["train.amp=off"], check_data=False)
    info = SimpleNamespace(device=CPU, world_size=1, local_rank=0, local_world_size=1)
    model = torch.nn.Linear(2, 2)
    assert hardware.maybe_compile(cfg, info, model, model, "off", 1000, 64) is model  # 500 s: eager
    assert hardware.maybe_compile(cfg, info, model, model, "off", 10_000, 64) == ("compiled", model)  # 83 min
    assert len(calls) == 1  # the step's time is cached
    assert caplog.records[-1].getMessage().startswith("compile on: auto: ~83 min of fp32 compute planned per rank")
    assert caplog.records[-1].getMessage().endswith(" (10000 steps x 0.50 s)")
    assert hardware.maybe_compile(cfg, info, model, model, "bf16", 10**6, 64) is model and len(calls) == 1


def test_model_compile_key_takes_auto_on_off_and_yaml_booleans(tmp_path):
    from train.config import ConfigError, load

    assert load(None, [], check_data=False).model.compile == "auto"
    assert load(None, ["model.compile=on"], check_data=False).model.compile == "on"
    (tmp_path / "c.yaml").write_text("model:\n  compile: true\n")  # a recipe written before `auto`
    assert load(str(tmp_path / "c.yaml"), [], check_data=False).model.compile == "on"
    with pytest.raises(ConfigError, match=r"^model.compile: 'true' is not one of auto, on, off$"):
        load(None, ["model.compile=true"], check_data=False)
