"""The CPU switches whose answer depends on the ISA, measured side by side on the demo's model:
bf16 autocast vs fp32, channels_last vs NCHW, intra-op threads (the rank's share vs 1), and
torch.compile (inductor) vs eager including its compile time. Each pair alternates in one
process, so drift in machine speed hits both; ratios are printed last.

    python benchmarks/cpu_switches.py                           # resnet20, 28 px, batch 128
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_switches.py   # an AVX2-only CPU, emulated
    python benchmarks/cpu_switches.py --compile                 # + inductor (needs a C++ compiler; minutes)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import ModelConfig  # noqa: E402
from train.hardware import cpu_info, machine_header  # noqa: E402
from train.models import build  # noqa: E402


def make(args, channels_last: bool):
    torch.manual_seed(0)
    model = build(ModelConfig(name=args.model, stem="cifar"), 10)
    x = torch.randn(args.batch, 3, args.size, args.size)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, opt, x, torch.randint(0, 10, (args.batch,))


def steps_per_s(model, opt, x, y, amp: str, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def compare(args, a: dict, b: dict) -> tuple[float, float]:
    """Median img/s of settings a and b (keys: channels_last, amp, threads), alternating."""
    runs = {id(a): [], id(b): []}
    built = {id(s): make(args, s["channels_last"]) for s in (a, b)}
    for r in range(args.repeats + 1):
        for s in (a, b):
            torch.set_num_threads(s["threads"])
            rate = steps_per_s(*built[id(s)], s["amp"], args.steps) * args.batch
            if r:  # round 0 warms up oneDNN's kernels
                runs[id(s)].append(rate)
    return statistics.median(runs[id(a)]), statistics.median(runs[id(b)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    share = cpu_info().cpus
    print(machine_header())
    base = {"channels_last": True, "amp": "off", "threads": 1}
    rows = []
    for name, a, b in [
        ("bf16 / fp32 (channels_last, 1 thread)", {**base, "amp": "bf16"}, base),
        ("channels_last / NCHW (fp32, 1 thread)", base, {**base, "channels_last": False}),
        ("channels_last / NCHW (bf16, 1 thread)", {**base, "amp": "bf16"},
         {**base, "amp": "bf16", "channels_last": False}),
        (f"{share} threads / 1 thread (fp32, one rank)", {**base, "threads": share}, base),
    ]:
        ra, rb = compare(args, a, b)
        rows.append((name, ra, rb))
    if args.compile:
        torch.set_num_threads(1)
        model, opt, x, y = make(args, True)
        eager = statistics.median(steps_per_s(model, opt, x, y, "off", args.steps) for _ in range(args.repeats))
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        steps_per_s(compiled, opt, x, y, "off", 1)
        compile_s = time.perf_counter() - t0
        fast = statistics.median(steps_per_s(compiled, opt, x, y, "off", args.steps) for _ in range(args.repeats))
        rows.append(("compiled / eager (fp32, 1 thread)", fast * args.batch, eager * args.batch))
        gain = 1 / eager - 1 / fast  # seconds saved per step
        print(f"compile time {compile_s:.0f} s: pays off after {compile_s / max(gain, 1e-9):.0f} steps")
    print(f"{args.model}, batch {args.batch}, {args.size} px, {args.steps} steps x {args.repeats} repeats")
    for name, ra, rb in rows:
        print(f"{name:42s} {ra:8.0f} vs {rb:8.0f} img/s  ratio {ra / rb:.2f}")


if __name__ == "__main__":
    main()
