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
QUIET = {1: 3.94, 2: 2.11}  # s per forward/backward, resnet18 fp32 batch 32, 224 px
LOADED = {1: 8.56, 2: 9.92}  # the same with other jobs on the cores (load 3.7)


def test_all_cores_compute_beside_nicer_decode_workers():
    assert hardware.cpu_threads(2, 2, QUIET) == (2, 10, "all 2 CPUs of the rank's share compute; 2 decode workers "
                                                 "beside them at nice +10 (probe: 1 thread 3940 ms, 2 threads "
                                                 "2110 ms per forward/backward)")
    assert hardware.cpu_threads(2, 0, QUIET)[:2] == (2, 0)  # nothing to nice
    assert hardware.cpu_threads(16, 8, {1: 1.6, 16: 0.12})[:2] == (16, 10)


def test_threads_that_do_not_help_are_not_taken():
    threads, nice, why = hardware.cpu_threads(2, 2, LOADED)
    assert (threads, nice) == (1, 0)  # and the workers keep their priority: niced, other jobs would starve them
    assert why == ("2 threads were not 1.25x faster than 1 (other jobs holding cores?); 1 thread (probe: 1 thread "
                   "8560 ms, 2 threads 9920 ms per forward/backward)")
    assert hardware.cpu_threads(2, 2, {1: 1.0, 2: 0.9})[0] == 1  # 1.11x: within the margin
    assert hardware.cpu_threads(2, 2, {1: 1.0, 2: 0.7})[0] == 2
    assert hardware.cpu_threads(1, 2, {}) == (1, 0, "the rank's share is one CPU")


def run_choose(monkeypatch, overrides=(), env=None, step=QUIET, share=2, loadavg=0.0):
    """hardware.choose on a `share`-CPU share with the probe replaced by `step`; returns
    (threads, the nice the loader was given, number of probe runs)."""
    from types import SimpleNamespace

    from train.config import load

    calls, nice = [], []

    def probe_threads(model, batch, crop, channels_last, amp, counts):
        calls.append(counts)
        return {t: step[t] for t in counts}

    monkeypatch.setattr(hardware, "probe_threads", probe_threads)
    monkeypatch.setattr(hardware, "_share", lambda info: share)
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (loadavg,) * 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    cfg = load(None, ["data.workers=2", "train.amp=off", *overrides], check_data=False)
    info = SimpleNamespace(device=CPU, world_size=1, local_rank=0, local_world_size=1)
    loader = SimpleNamespace(loader=SimpleNamespace(set_decode_nice=nice.append))  # as inside MixLoader
    before = torch.get_num_threads()
    try:
        _, threads, step_s = hardware.choose(cfg, info, torch.nn.Linear(2, 2), 32, loader)
        assert torch.get_num_threads() == threads
        probed = share > 1 and not env and not any(o.startswith("dist.cpu_threads") for o in overrides)
        assert step_s == (pytest.approx(step[threads]) if probed else None)  # maybe_compile's step, not re-timed
    finally:
        torch.set_num_threads(before)
    return threads, nice[0] if nice else None, len(calls)


def test_choose_probes_once_and_caches(monkeypatch, caplog):
    caplog.set_level("INFO", logger="resnet")
    assert run_choose(monkeypatch) == (2, 10, 1)
    assert run_choose(monkeypatch) == (2, 10, 0)  # cached: no probe
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("threads ")]
    assert lines[0].startswith("threads 2: all 2 CPUs of the rank's share compute; 2 decode workers beside them")
    assert lines[1].endswith(f"[cached in {hardware.cache_path().with_name('threads.json')}]")
    cached = json.loads(hardware.cache_path().with_name("threads.json").read_text())
    (key,) = cached
    assert "|batch 32|crop 224|channels_last True|amp off|share 2|ranks/node 1" in key
    assert cached[key] == {"1": 3.94, "2": 2.11}
    assert run_choose(monkeypatch, ["model.name=resnet18"], step=LOADED) == (1, 0, 1)  # another key: probed


def test_a_probe_on_a_busy_machine_decides_this_run_only(monkeypatch, caplog):
    caplog.set_level("INFO", logger="resnet")
    assert run_choose(monkeypatch, step=LOADED, loadavg=50.0) == (1, 0, 1)
    assert caplog.records[-1].getMessage().endswith("[not cached: load average 50.0 on "
                                                    f"{len(os.sched_getaffinity(0))} CPUs]")
    assert run_choose(monkeypatch, loadavg=50.0) == (2, 10, 1)  # measured again
    assert not hardware.cache_path().with_name("threads.json").exists()


def test_the_user_and_the_config_win_without_a_probe(monkeypatch):
    assert run_choose(monkeypatch, ["dist.cpu_threads=2"]) == (2, None, 0)
    assert run_choose(monkeypatch, env={"OMP_NUM_THREADS": "2"}) == (2, None, 0)
    assert run_choose(monkeypatch, share=1) == (1, 0, 0)


def test_decode_workers_start_at_the_nice_they_were_given(tiny_data):
    from types import SimpleNamespace

    from data import torch_loader
    from train.config import DataConfig

    cfg = DataConfig(root=str(tiny_data), batch_size=4, workers=1, train_crop=32, val_resize=32, val_crop=32)
    info = SimpleNamespace(rank=0, world_size=1, local_rank=0, device=CPU)
    train, _, _ = torch_loader.build(cfg, info, seed=0, channels_last=False)
    train.set_decode_nice(7)
    train.set_epoch(0)
    next(iter(train))
    (worker,) = train.loader._iterator._workers
    assert os.getpriority(os.PRIO_PROCESS, worker.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7


def test_compile_auto_where_the_planned_steps_repay_it(monkeypatch):
    monkeypatch.setattr(hardware, "c_compiler", lambda: "/usr/bin/g++")

    def choice(requested, device, amp, planned=0.0, crop=28):
        return hardware.compile_choice(requested, device, amp, planned, crop=crop)

    demo_fp32 = 937 * 0.31  # planned steps per rank x probed seconds: the demo in fp32, ~5 min
    assert choice("auto", CPU, "off", demo_fp32) == (
        False, "auto: ~5 min of fp32 compute planned per rank; compiling repays itself from ~10 min (saves >= 13% "
               "of a step at <= 64 px, ~40 s to compile, 2x margin)")
    assert choice("auto", CPU, "off", 36 * 234 * 0.46)[0]  # the 36-epoch recipe in fp32: ~65 min
    assert choice("auto", CPU, "off", 36 * 234 * 0.46, crop=64)[0]
    assert choice("auto", CPU, "off", 10**6, crop=224) == (  # resnet18 at 224 px: 0.97-1.02x
        False, "auto: at 224 px compiling gained 0.97-1.02x in fp32 (resnet18 at 224 px), eager")
    assert not choice("auto", CPU, "bf16", 10**6)[0]  # bf16: 0.89-1.29x, not reliably worth it
    assert not choice("auto", torch.device("cuda", 0), "bf16", 10**6)[0]  # GPUs: eager unless asked
    assert choice("on", CPU, "bf16", crop=224) == (True, "set in the config")
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
    cfg = load(None, ["train.amp=off", "data.train_crop=32"], check_data=False)
    info = SimpleNamespace(device=CPU, world_size=1, local_rank=0, local_world_size=1)
    model = torch.nn.Linear(2, 2)
    large = load(None, ["train.amp=off"], check_data=False)  # 224 px: eager without timing a step
    assert hardware.maybe_compile(large, info, model, model, "off", 10**6, 64) is model and calls == []
    assert hardware.maybe_compile(cfg, info, model, model, "off", 1000, 64) is model  # 500 s: eager
    assert hardware.maybe_compile(cfg, info, model, model, "off", 10_000, 64) == ("compiled", model)  # 83 min
    assert len(calls) == 1  # the step's time is cached
    assert caplog.records[-1].getMessage().startswith("compile on: auto: ~83 min of fp32 compute planned per rank")
    assert caplog.records[-1].getMessage().endswith(" (10000 steps x 0.50 s)")
    assert hardware.maybe_compile(cfg, info, model, model, "bf16", 10**6, 64) is model and len(calls) == 1
    assert hardware.maybe_compile(cfg, info, model, model, "off", 10_000, 32, step_s=0.1) == ("compiled", model)
    assert len(calls) == 1 and caplog.records[-1].getMessage().endswith(" (10000 steps x 0.10 s)")  # timed by choose


def test_model_compile_key_takes_auto_on_off_and_yaml_booleans(tmp_path):
    from train.config import ConfigError, load

    assert load(None, [], check_data=False).model.compile == "auto"
    assert load(None, ["model.compile=on"], check_data=False).model.compile == "on"
    (tmp_path / "c.yaml").write_text("model:\n  compile: true\n")  # a recipe written before `auto`
    assert load(str(tmp_path / "c.yaml"), [], check_data=False).model.compile == "on"
    with pytest.raises(ConfigError, match=r"^model.compile: 'true' is not one of auto, on, off$"):
        load(None, ["model.compile=true"], check_data=False)
