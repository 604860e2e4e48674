"""benchmarks/gpu.py, the acceptance call for a lent GPU, guarded on the CPU: the whole script end
to end with `--device cpu` (the same data layout: many classes, the same class folders in train
and val), and the mechanisms of its CUDA-only parts: wheels carried in parts, the sync counter's
classification, the helpers tests/test_gpu.py runs on the GPU."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks import gpu
from tests.conftest import ROOT


def table_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """{label: (value, detail)} from the printed table (columns are 2+ spaces apart)."""
    rows = {}
    for line in stdout.splitlines():
        for label in gpu.LABELS.values():
            if line.startswith(label + "  "):
                value, *detail = re.split(r"\s{2,}", line[len(label):].strip(), maxsplit=1)
                rows[label] = (value, detail[0] if detail else "")
    return rows


def test_cpu_run_prints_every_row(tmp_path):
    """40 classes of 2 train + 1 val ImageNet-sized JPEGs, resnet18 at 64 px, batch 8, the demo on
    shapes-10 (40 + 10 a class), SyncBN on 2 gloo ranks; torch.compile's rows are left out
    (--no-compile: 130 s for resnet18 on this CPU). Every other row must hold a value."""
    cmd = [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--work", str(tmp_path), "--no-compile",
           "--classes", "40", "--train-per-class", "2", "--val-per-class", "1", "--workers", "2",
           "--budget", "600", "--hard-limit", "840"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    rows = table_rows(r.stdout)
    assert list(rows) == list(gpu.LABELS.values()), r.stdout  # every row, once, in order
    skipped = {label for label, (value, _) in rows.items() if value == "skipped"}
    assert skipped == {gpu.LABELS[k] for k in ("train_synthetic_compiled", "train_dali_compiled",
                                               "train_torch_compiled")}, r.stdout
    assert all(rows[label][1] == "--no-compile" for label in skipped)
    assert not [label for label, (value, _) in rows.items() if value.startswith(("FAILED", "not reached"))]

    data = rows["ImageNet-like JPEGs"]
    assert "40 classes, 80 train / 40 val" in data[1]
    assert 90 <= float(data[0].split()[0]) <= 130  # KiB, against ImageNet's ~110
    assert re.fullmatch(r"\d+ skipped", rows["pytest -m gpu"][0])  # no CUDA here: every GPU test skips
    top1 = re.match(r"([\d.]+) % top-1 \(EMA ([\d.]+) %\)", rows["demo recipe end to end"][0])
    assert top1 and 0 <= float(top1.group(1)) <= 100
    assert "async ckpt step_7 + resume" in rows["demo recipe end to end"][1]  # 400 images / 64: 12 steps, cut at 7
    assert float(rows["SyncBN agreement, 2 ranks"][0].split()[1]) <= 1e-4  # "ours 1.5e-05"
    assert rows["host syncs per step"][0] == "0"
    for label in ("train img/s, synthetic, amp auto", "train img/s, DALI", "train img/s, torch loader",
                  "DALI pipeline alone, RRC+flip", "torch loader alone, RRC+flip"):
        assert float(rows[label][0].split()[0].replace(",", "")) > 0, label
    assert rows["peak memory"][0].endswith("GiB")


def test_jpegs_share_their_classes_and_are_made_once(tmp_path):
    """The old script took the first N files of a sorted glob (train 3 classes, val 5): here both
    splits hold every class, the `done` record holds the counts, and other counts remake it."""
    from data import folder
    from train.config import DataConfig

    root = tmp_path / "d"
    made = gpu.make_jpegs(root, "imagenet", classes=3, train_per_class=2, val_per_class=1)
    assert made["images"] == 9 and json.loads((root / "done").read_text())["images"] == 9
    train, val = folder.open_splits(DataConfig(root=str(root)))
    assert train.classes == val.classes == [f"n{c:08d}" for c in range(3)]
    assert [s[1] for s in train.samples] == [0, 0, 1, 1, 2, 2] and [s[1] for s in val.samples] == [0, 1, 2]
    stamp = (root / "done").stat().st_mtime_ns
    assert gpu.make_jpegs(root, "imagenet", classes=3, train_per_class=2, val_per_class=1) == made
    assert (root / "done").stat().st_mtime_ns == stamp  # reused
    next(root.glob("train/*/*.JPEG")).unlink()  # cut short: made again
    assert gpu.make_jpegs(root, "imagenet", classes=3, train_per_class=2, val_per_class=1)["images"] == 9
    assert len(list(root.glob("*/*/*.JPEG"))) == 9
    assert gpu.make_jpegs(root, "shapes", classes=2, train_per_class=3, val_per_class=2)["images"] == 10
    assert len(list(root.glob("*/*/*.JPEG"))) == 10


def fake_wheel(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_wheels_carried_in_parts_install_and_import(tmp_path):
    """What the device calls do: parts carried one call each into one folder, joined, checked
    against manifest.json, unpacked; `nvidia` was imported before (torch's namespace, and a failed
    `import nvidia.dali`), and a child process sees the packages too (PYTHONPATH)."""
    extend = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
    wheels = [fake_wheel(tmp_path / "fakedali-1.0-py3-none-any.whl",
                         {"nvidia/__init__.py": extend, "nvidia/fakedali/__init__.py": "__version__ = '1.0'\n",
                          "fakedali-1.0.dist-info/METADATA": "Name: fakedali\n",
                          "fakedali-1.0.data/scripts/tool": "#!/bin/sh\n"}),
              fake_wheel(tmp_path / "fakesix-2.0-py3-none-any.whl", {"fakesix.py": "X = 2\n" + "#" * 3000})]
    parts = gpu.pack_parts(wheels, tmp_path / "staged", part_bytes=2048)
    assert len(parts) >= 3 and (parts[-1] / gpu.MANIFEST).exists()
    carried = tmp_path / "gpuw"
    carried.mkdir()
    for part in parts:
        for f in part.iterdir():
            shutil.copy(f, carried)
    site = tmp_path / "site"
    assert gpu.install_wheels(carried, site) == "2 wheels"
    assert (site / "nvidia/fakedali/__init__.py").exists() and not (site / "fakedali-1.0.data").exists()
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import nvidia, subprocess; "
            "from pathlib import Path; from benchmarks.gpu import use_site; "
            f"use_site(Path({str(site)!r})); import nvidia.fakedali, fakesix; "
            "print(nvidia.fakedali.__version__, fakesix.X); "
            "subprocess.run([sys.executable, '-c', 'import nvidia.fakedali, fakesix; print(\"child ok\")'], "
            "check=True)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1.0", "2", "child", "ok"]

    (carried / "chunk.01").unlink()  # the machine went cold between two calls
    with pytest.raises(FileNotFoundError, match=rf"1 of {len(parts)} parts missing or short \(chunk.01\)"):
        gpu.install_wheels(carried, tmp_path / "site2")
    shutil.copy(parts[1] / "chunk.01", carried)
    blob = bytearray((carried / "chunk.00").read_bytes())
    blob[100] ^= 0xFF
    (carried / "chunk.00").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        gpu.install_wheels(carried, tmp_path / "site3")


def test_sync_debug_counter_sorts_the_flush_from_the_step(tmp_path, monkeypatch):
    """The CUDA row counts torch's sync-debug warnings by the function that raised them: the
    trainer's flush (its reduce) apart from the step. The text is torch's own (in libc10_cuda)."""
    lib = next(Path(torch.__file__).parent.glob("lib/libc10_cuda.so"), None)
    if lib is not None:
        assert gpu.SYNC_WARNING.encode() in lib.read_bytes()
    src = tmp_path / "trainer.py"
    src.write_text("import warnings\n\n\ndef reduce():\n    warnings.warn('called a synchronizing CUDA operation')\n"
                   "\n\ndef train_epoch():\n    x = 1\n    warnings.warn('called a synchronizing CUDA operation')\n"
                   "    warnings.warn('something else')\n")
    namespace: dict = {}
    exec(compile(src.read_text(), str(src), "exec"), namespace)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    counter = gpu.SyncDebugCounter()
    namespace["reduce"]()  # before start: not counted
    counter.start()
    namespace["train_epoch"]()
    namespace["reduce"]()
    counter.stop()
    assert counter.hits == [("trainer.py", 10, "train_epoch"), ("trainer.py", 5, "reduce")]
    assert [h for h in counter.hits if h[2] in gpu.FLUSH_FUNCTIONS] == [("trainer.py", 5, "reduce")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the counter restored the filters
        with pytest.raises(UserWarning):
            namespace["reduce"]()


def test_gpu_test_helpers_on_the_cpu(tmp_path, tiny_data, monkeypatch):
    """tests/test_gpu.py's helpers, run here where they can be: DALI's pipeline built twice on the
    same seed gives the same crops and flips (the GPU test's premise, compared against the GPU
    build there), the amp loss curves, and a dist.device=cpu run's CUDA state."""
    from tests import test_gpu

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    losses = {amp: test_gpu.amp_losses(amp, torch.device("cpu"), steps=3) for amp in ("off", "bf16")}
    assert losses["off"].shape == (3,) and (losses["bf16"] - losses["off"]).abs().max() <= 0.05
    assert test_gpu.cuda_state_after_cpu_run(tmp_path, tiny_data) == {"initialized": False, "contexts": None}
    in_step, in_flush = gpu.count_syncs(test_gpu.sync_config(tmp_path, tiny_data, "torch", "cpu", amp="off"),
                                        torch.device("cpu"), window=3)
    assert in_step == [] and in_flush == []  # on the CPU: item/bool calls; the flush's tolist is not one
    pytest.importorskip("nvidia.dali")
    gpu.make_jpegs(tmp_path / "jpegs", "imagenet", classes=3, train_per_class=8, val_per_class=4)
    a, b = (test_gpu.dali_batches(tmp_path / "jpegs", "cpu", torch.device("cpu")) for _ in range(2))
    assert len(a) == 5 and test_gpu.pixel_diff(a, b) == (0.0, 0.0)
