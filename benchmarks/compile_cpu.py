"""torch.compile (inductor) on the CPU: its compile time against its per-step gain, per model and
dtype, so that `model.compile: auto` can compile where the planned steps repay it.

Each setting runs in its own process with an empty inductor cache (a first run on a fresh machine:
the cache in /tmp/torchinductor_<user> makes later runs compile faster). Printed per setting:
eager and compiled seconds per step (median after warm-up), the first compiled step's extra
seconds (the compile), and the break-even: the steps after which compiling has saved time.

    python benchmarks/compile_cpu.py                                   # the demo's model, fp32 and bf16
    python benchmarks/compile_cpu.py --models resnet18:224:64 resnet50:224:32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(model_name: str, size: int, batch: int, amp: str, threads: int, steps: int) -> dict:
    """Runs in the child: eager then compiled steps of `model_name` on random data."""
    import torch
    from torch import nn

    from train.config import ModelConfig
    from train.models import build

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build(ModelConfig(name=model_name), 10 if size <= 64 else 1000)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(m) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    step(model)  # oneDNN's kernels
    compiled = torch.compile(model)
    first = step(compiled)
    step(compiled)
    eager, fast = [], []
    for _ in range(steps):  # alternate, so that drift in machine speed hits both
        eager.append(step(model))
        fast.append(step(compiled))
    e, c = statistics.median(eager), statistics.median(fast)
    return {"eager_s": e, "compiled_s": c, "compile_s": first - c,
            "break_even_steps": (first - c) / (e - c) if e > c else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20:28:128"], help="name:size:batch")
    p.add_argument("--amps", nargs="+", default=["off", "bf16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(*json.loads(args.child))))
        return
    from train.hardware import machine_header

    print(machine_header())
    for spec in args.models:
        name, size, batch = spec.split(":")
        for amp in args.amps:
            with tempfile.TemporaryDirectory() as cache:
                out = subprocess.run(
                    [sys.executable, __file__, "--child",
                     json.dumps([name, int(size), int(batch), amp, args.threads, args.steps])],
                    env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}, capture_output=True, text=True)
            if out.returncode:
                print(f"{spec} {amp}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            be = f"{r['break_even_steps']:.0f} steps" if r["break_even_steps"] else "never"
            print(f"{name} {size} px batch {batch} amp {amp} {args.threads} thread(s): eager {r['eager_s']:.3f} s, "
                  f"compiled {r['compiled_s']:.3f} s/step ({r['eager_s'] / r['compiled_s']:.2f}x), "
                  f"compile {r['compile_s']:.0f} s, pays after {be}", flush=True)


if __name__ == "__main__":
    main()
