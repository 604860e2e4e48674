"""The one acceptance call for a lent GPU: what only a GPU can show, printed as ONE table at the end.

    python3 benchmarks/gpu.py --wheels /tmp/gpuw     # a bare GPU machine (docs/gpu.md: the calls)
    python benchmarks/gpu.py --device cpu            # the same code on a CPU, small counts (CI)
    python benchmarks/gpu.py --stage .gpu            # here: stage DALI's wheels in parts for the calls

It needs no datasets/, no internet and no apt: it makes its own JPEGs (below) and, where DALI is
missing, installs it from the wheels carried in parts with the device calls (`--stage` writes
them, `--wheels` joins, checks and unpacks them into /tmp/site). A row that cannot run says why;
no row stops the others; a watchdog prints the table before the command limit if a row hangs.

Rows, in the order they run (most important first, so a tight time budget skips the least):
  pytest -m gpu (tests/test_gpu.py) | the demo recipe end to end (train/main.py under torchrun:
  DALI GPU loader, amp auto, EMA, async checkpoint mid-epoch, resume, 2 epochs, top-1 bar) |
  SyncBN with 2 ranks against plain BN on the concatenated batch, and its cost per step |
  trainer img/s (train/trainer.py's own step loop) for synthetic data (amp auto, and fp32 with
  TF32 as training runs it), DALI and the torch loader | the input pipelines alone, with DALI's
  augmentation cost (RRC + flip against + TrivialAugment + erasing) | host syncs per step
  (torch.cuda.set_sync_debug_mode over real steps of the loop) | the same img/s rows with
  torch.compile | peak memory.

Data (what a bare machine can make): "ImageNet-like" JPEGs, 500x375, quality 90, procedural
natural-ish content (smooth noise at five scales, a colour ramp, filled shapes, luma grain:
~109 KiB each against ImageNet's ~110 KiB mean; the table prints the measured mean), with the same
class folders in train and val. The demo's data: "shapes-10", 28x28 JPEGs of ten shape classes
(disk, square, triangle, ...) drawn at a random size, place, angle and colour on a noisy
background, Fashion-MNIST's sizes (6,000 train and 1,000 val images a class).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (key, label): every row the table prints, in this order (tests/test_gpu_bench.py checks them all)
ROWS = [
    ("env", "device"),
    ("dali", "DALI"),
    ("data", "ImageNet-like JPEGs"),
    ("pytest", "pytest -m gpu"),
    ("demo", "demo recipe end to end"),
    ("syncbn_agree", "SyncBN agreement, 2 ranks"),
    ("syncbn_cost", "SyncBN cost per step, 2 ranks"),
    ("train_synthetic", "train img/s, synthetic, amp auto"),
    ("train_synthetic_fp32", "train img/s, synthetic, fp32 (TF32)"),
    ("train_dali", "train img/s, DALI"),
    ("train_torch", "train img/s, torch loader"),
    ("pipe_dali", "DALI pipeline alone, RRC+flip"),
    ("pipe_dali_aug", "DALI pipeline alone, +TA+erasing"),
    ("pipe_torch", "torch loader alone, RRC+flip"),
    ("host_syncs", "host syncs per step"),
    ("train_synthetic_compiled", "train img/s, synthetic, compiled"),
    ("train_dali_compiled", "train img/s, DALI, compiled"),
    ("train_torch_compiled", "train img/s, torch loader, compiled"),
    ("peak_mem", "peak memory"),
]
LABELS = dict(ROWS)
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")
# top-1 % the demo must reach after 2 epochs on shapes-10 at full size. The issue asked >= 90 %, for
# Fashion-MNIST; shapes-10 is easier: 99.89 % (EMA 99.69 %) measured on the CPU (DALI CPU, bf16, 1 rank,
# Xeon AMX, 2026-12-06), so the bar sits near what a working path reaches.
DEMO_BAR = 98.0
DEMO_BAR_MIN_PER_CLASS = 3000  # below this many train images a class the bar is not applied (CPU CI)


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the table ------------------------------------------------------------------------------------

class Table:
    """Rows keyed as in ROWS. A row is (value, detail); `run` records a failure as ("FAILED",
    reason) and a row not reached as ("skipped", why); `print` happens once, from the main thread at
    the end or from the watchdog when the hard limit comes first."""

    def __init__(self, budget_s: float, hard_s: float, header: str, out: Path | None = None):
        self.out = out  # also write the table to `out`/table.txt
        self.rows: dict[str, tuple[str, str]] = {}
        self.t0, self.budget_s, self.hard_s, self.header = time.monotonic(), budget_s, hard_s, header
        self.current: str | None = None
        self.current_start = 0.0
        self.children: list[subprocess.Popen] = []
        self._printed = threading.Lock()
        self._done = False

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def set(self, key: str, value: str, detail: str = "") -> None:
        self.rows[key] = (value, detail)

    def run(self, key: str, fn, *, need_s: float = 0.0, unless: str | None = None) -> None:
        """fn() -> (value, detail). Skipped with a reason when `unless` is given or fewer than
        `need_s` seconds of the budget are left; any exception becomes the row's reason."""
        if key in self.rows:
            return
        if unless:
            self.set(key, "skipped", unless)
            return
        if need_s and self.left() < need_s:
            self.set(key, "skipped", f"time budget: {max(0, self.left()):.0f} s left of {self.budget_s:.0f} s, "
                                     f"needs ~{need_s:.0f} s (--budget)")
            return
        self.current, self.current_start = key, time.monotonic()
        log(f"{LABELS[key]} ...")
        try:
            value, detail = fn()
        except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
            value, detail = "FAILED", short_error(e)
            log(f"{LABELS[key]} failed:\n{traceback.format_exc()}")
        finally:
            self.current = None
        self.set(key, value, detail)
        log(f"{LABELS[key]}: {value}  {detail}  ({time.monotonic() - self.current_start:.0f} s)")

    def text(self) -> str:
        rows = []
        for key, label in ROWS:
            value, detail = self.rows.get(key, ("not reached", ""))
            if key == self.current:
                value, detail = "FAILED", f"hard limit: running for {time.monotonic() - self.current_start:.0f} s"
            rows.append((label, value, detail))
        w0, w1 = max(len(r[0]) for r in rows), min(34, max(len(r[1]) for r in rows))
        lines = [self.header, ""] + [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        lines.append(f"\n{len(rows)} rows in {self.elapsed():.0f} s")
        return "\n".join(lines)

    def print(self) -> bool:
        with self._printed:
            if self._done:
                return False
            self._done = True
        text = self.text()
        print("\n" + text, flush=True)
        if self.out is not None:
            with contextlib.suppress(OSError):
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "table.txt").write_text(text + "\n")
        return True

    def watchdog(self) -> None:
        """At `hard_s`: print what there is, stop the children, exit 124 (a row hung)."""
        def fire():
            for p in list(self.children):
                with contextlib.suppress(Exception):
                    os.killpg(p.pid, 9)
            if self.print():
                os._exit(124)
        t = threading.Timer(self.hard_s, fire)
        t.daemon = True
        t.start()

    def spawn(self, cmd: list[str], *, name: str, timeout: float, env: dict | None = None, cwd: Path = ROOT
              ) -> subprocess.CompletedProcess:
        """A child in its own process group (the watchdog and a timeout kill all of it), its
        timeout cut to what the hard limit leaves; its output also goes to `out`/<name>.log."""
        timeout = max(5.0, min(timeout, self.hard_s - self.elapsed() - 20))
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        self.children.append(p)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            out, _ = p.communicate()
            raise TimeoutError(f"{' '.join(cmd[:4])}... killed after {timeout:.0f} s; output ends: "
                               f"{tail(out, 1)}") from None
        finally:
            self.children.remove(p)
            if self.out is not None:
                with contextlib.suppress(OSError):
                    self.out.mkdir(parents=True, exist_ok=True)
                    (self.out / f"{name}.log").write_text(out or "")
        return subprocess.CompletedProcess(cmd, p.returncode, out, "")


def short_error(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:140] if lines else ''}"


def tail(text: str, n: int = 3) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[:300]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- JPEGs a bare machine can make ---------------------------------------------------------------

OCTAVES = ((3, 70.0), (12, 45.0), (48, 32.0), (160, 28.0), (250, 24.0))  # (cells across, amplitude)
GRAIN = 20  # +-luma grain: sets the JPEG size (measured: 104 KiB at 16, 109 KiB at 20, quality 90)


def natural_image(rng: np.random.Generator, w: int = 500, h: int = 375, tint=(0.0, 0.0, 0.0)) -> np.ndarray:
    """A natural-ish RGB image: smooth noise at five scales (bicubic upsampling of random cells),
    a colour ramp, a few filled ellipses and rectangles, luma grain. ~20 ms on one core."""
    from PIL import Image, ImageDraw

    img = np.full((h, w, 3), 128.0, np.float32) + np.asarray(tint, np.float32)
    for cells, amp in OCTAVES:
        small = rng.integers(0, 256, (max(2, cells * h // w) + 1, cells + 1, 3), dtype=np.uint8)
        img += (np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32) - 127.5) * (amp / 74)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * np.arange(w, dtype=np.float32)[None, :] / w + np.sin(angle) * np.arange(
        h, dtype=np.float32)[:, None] / h
    img += ramp[..., None] * rng.uniform(-60, 60, 3).astype(np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0, s = rng.uniform(-50, w), rng.uniform(-50, h), rng.uniform(20, 200)
        box = [x0, y0, x0 + s, y0 + s * rng.uniform(0.5, 1.5)]
        (draw.ellipse if rng.integers(2) else draw.rectangle)(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    out = np.asarray(pil, np.int16) + rng.integers(-GRAIN, GRAIN + 1, (h, w, 1), dtype=np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


SHAPES = ("disk", "square", "triangle", "plus", "ring", "hbar", "vbar", "diamond", "cross", "dots")


def shape_image(rng: np.random.Generator, label: int, size: int = 28) -> np.ndarray:
    """Class `label`'s shape at a random size, place, angle and colour on a noisy background,
    drawn at 4x and downsampled (antialiased)."""
    from PIL import Image, ImageDraw

    big = 4 * size
    bg = rng.integers(0, 256, 3)
    base = np.clip(bg + rng.normal(0, 30, (big // 8, big // 8, 3)), 0, 255).astype(np.uint8)
    pil = Image.fromarray(base).resize((big, big), Image.BICUBIC)
    fg = tuple(int(v) for v in (bg + rng.choice([-1, 1], 3) * rng.integers(60, 160, 3)) % 256)
    shape = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(shape)
    r = big * rng.uniform(0.22, 0.4)
    cx, cy = big / 2 + rng.uniform(-0.15, 0.15) * big, big / 2 + rng.uniform(-0.15, 0.15) * big
    t = r * 0.35  # stroke width
    name = SHAPES[label]
    if name == "disk":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "square":
        d.rectangle([cx - r * 0.8, cy - r * 0.8, cx + r * 0.8, cy + r * 0.8], fill=255)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=255)
    elif name == "plus":
        d.rectangle([cx - r, cy - t / 2, cx + r, cy + t / 2], fill=255)
        d.rectangle([cx - t / 2, cy - r, cx + t / 2, cy + r], fill=255)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        d.ellipse([cx - r + t, cy - r + t, cx + r - t, cy + r - t], fill=0)
    elif name == "hbar":
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
    elif name == "vbar":
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
    elif name == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=255)
    elif name == "cross":
        d.line([(cx - r, cy - r), (cx + r, cy + r)], fill=255, width=int(t))
        d.line([(cx - r, cy + r), (cx + r, cy - r)], fill=255, width=int(t))
    else:  # two dots
        d.ellipse([cx - r, cy - t, cx - r + 2 * t, cy + t], fill=255)
        d.ellipse([cx + r - 2 * t, cy - t, cx + r, cy + t], fill=255)
    shape = shape.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, center=(cx, cy))
    pil.paste(Image.new("RGB", (big, big), fg), (0, 0), shape)
    return np.asarray(pil.resize((size, size), Image.BOX))


def _write_images(job) -> int:
    """Worker: (kind, root, seed, [(split, class index, file index)]) -> bytes written."""
    kind, root, seed, items = job
    from PIL import Image

    total = 0
    for split, c, i in items:
        rng = np.random.default_rng((seed, c, i, split == "val"))
        if kind == "imagenet":
            tint = np.random.default_rng((seed, c)).uniform(-25, 25, 3)  # a class's colour cast
            pixels = natural_image(rng, tint=tint)
        else:
            pixels = shape_image(rng, c)
        path = Path(root) / split / f"n{c:08d}" / f"{kind}_{c:04d}_{i:05d}.JPEG"
        Image.fromarray(pixels).save(path, quality=90)
        total += path.stat().st_size
    return total


def make_jpegs(root: Path, kind: str, *, classes: int, train_per_class: int, val_per_class: int,
               workers: int = 1, seed: int = 0) -> dict:
    """`root`/{train,val}/n0000000k/*.JPEG with the same `classes` folders in both splits, made
    once: `root`/done holds the counts it was made with (and the mean size), so a copy made for
    other counts, or cut short, is made again. Returns the `done` record."""
    want = {"kind": kind, "classes": classes, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "seed": seed, "images": classes * (train_per_class + val_per_class)}
    done = root / "done"
    with contextlib.suppress(OSError, ValueError):
        have = json.loads(done.read_text())
        if {k: have.get(k) for k in want} == want and sum(1 for _ in root.glob("*/*/*.JPEG")) == want["images"]:
            return have
    shutil.rmtree(root, ignore_errors=True)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    items = [(s, c, i) for s, n in (("train", train_per_class), ("val", val_per_class))
             for c in range(classes) for i in range(n)]
    chunk = max(1, len(items) // (workers * 8))
    jobs = [(kind, str(root), seed, items[k:k + chunk]) for k in range(0, len(items), chunk)]
    t0 = time.perf_counter()
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:  # workers touch numpy and PIL only
            total = sum(pool.imap_unordered(_write_images, jobs))
    else:
        total = sum(map(_write_images, jobs))
    record = {**want, "mean_kib": total / len(items) / 1024, "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(record))
    return record


# -- DALI from wheels carried with the call --------------------------------------------------------

# What the device lacks for DALI (CUDA 13 build, as torch's default wheel) and submitit, for Python 3.12;
# versions as resolved on 2026-12-06. six: DALI's autograph (data.auto_augment's conditionals) imports it.
STAGE_PACKAGES = ["nvidia-dali-cuda130==2.4.0", "nvidia-nvimgcodec-cu13==0.9.0.20", "nvidia-libnvcomp-cu13==5.3.0.16",
                  "nvidia-nvjpeg==13.3.2.43", "nvidia-nvjpeg2k-cu13==0.11.0.51", "nvidia-nvtiff-cu13==0.8.0.82",
                  "astunparse==1.6.3", "gast==0.7.0", "makefun==1.16.0", "libcst==1.9.0", "nvtx==0.2.17",
                  "optree==0.20.0", "six==1.17.0", "submitit==1.5.4", "cloudpickle==3.1.2"]
PART_BYTES = 56 << 20  # one device call carries at most 64 MiB with the working tree
MANIFEST = "manifest.json"


def stage(out: Path, python: str = "3.12", packages: list[str] = STAGE_PACKAGES) -> list[Path]:
    """Download the device's wheels (here, with pip) and pack them in parts under `out`."""
    shutil.rmtree(out, ignore_errors=True)
    wheels = out / "wheels"
    plat = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                        "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64") for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", *plat, "-d", str(wheels), *packages],
                   check=True)
    parts = pack_parts(sorted(wheels.glob("*.whl")), out, note={"packages": packages, "python": python})
    shutil.rmtree(wheels)
    return parts


def pack_parts(wheels: list[Path], out: Path, part_bytes: int = PART_BYTES, note: dict | None = None) -> list[Path]:
    """One tar of `wheels` cut into `out`/part<k>/chunk.<kk> of at most `part_bytes`; the last
    part also holds manifest.json (the chunks, their sizes, the tar's sha256) for install_wheels."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for whl in wheels:
            tar.add(whl, arcname=whl.name)
    data = buf.getvalue()
    chunks, parts = [], []
    for k in range(0, len(data), part_bytes):
        part = out / f"part{len(parts) + 1}"
        part.mkdir(parents=True)
        name = f"chunk.{len(chunks):02d}"
        (part / name).write_bytes(data[k:k + part_bytes])
        chunks.append({"name": name, "bytes": len(data[k:k + part_bytes])})
        parts.append(part)
    (parts[-1] / MANIFEST).write_text(json.dumps({"chunks": chunks, "sha256": hashlib.sha256(data).hexdigest(),
                                                  **(note or {})}, indent=1))
    return parts


def install_wheels(src: Path, site: Path) -> str:
    """Join `src`/chunk.* (checked against `src`/manifest.json when there is one) or take
    `src`/*.whl, and unpack every wheel into `site` (a wheel is a zip of site-packages; its
    *.data scripts are not needed here). Returns what was installed; raises with what is missing."""
    src = Path(src)
    chunks = sorted(src.glob("chunk.*"))
    wheels: dict[str, bytes] = {}
    if chunks:
        manifest = src / MANIFEST
        if manifest.exists():
            m = json.loads(manifest.read_text())
            missing = [c["name"] for c in m["chunks"]
                       if not (src / c["name"]).exists() or (src / c["name"]).stat().st_size != c["bytes"]]
            if missing:
                raise FileNotFoundError(f"{src}: {len(missing)} of {len(m['chunks'])} parts missing or short "
                                        f"({', '.join(missing)}): the machine went cold between calls; "
                                        "carry every part again (docs/gpu.md)")
        data = b"".join(c.read_bytes() for c in chunks)
        if manifest.exists() and hashlib.sha256(data).hexdigest() != json.loads(manifest.read_text())["sha256"]:
            raise ValueError(f"{src}: the joined parts do not match manifest.json's sha256")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".whl"):
                    wheels[member.name] = tar.extractfile(member).read()
    else:
        wheels = {p.name: p.read_bytes() for p in sorted(src.glob("*.whl"))}
    if not wheels:
        raise FileNotFoundError(f"{src}: no chunk.* and no *.whl")
    site.mkdir(parents=True, exist_ok=True)
    for blob in wheels.values():
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            z.extractall(site, [n for n in z.namelist() if not n.split("/", 1)[0].endswith(".data")])
    return f"{len(wheels)} wheels"


def use_site(site: Path) -> None:
    """Make packages unpacked into `site` importable here and in every child (PYTHONPATH)."""
    s = str(site)
    if s not in sys.path:
        sys.path.insert(0, s)
    nvidia = sys.modules.get("nvidia")  # imported already (a failed `import nvidia.dali`): extend its path
    if nvidia is not None and isinstance(getattr(nvidia, "__path__", None), list) and \
            str(site / "nvidia") not in nvidia.__path__:
        nvidia.__path__.insert(0, str(site / "nvidia"))
    import importlib
    importlib.invalidate_caches()
    os.environ["PYTHONPATH"] = os.pathsep.join([s, *filter(None, [os.environ.get("PYTHONPATH")])])


def ensure_dali(wheels: str | None, site: Path) -> tuple[str | None, str]:
    """(DALI version or None, how it was had or why not)."""
    try:
        import nvidia.dali as dali
        return dali.__version__, f"installed already ({Path(dali.__file__).parent})"
    except ImportError as e:
        missing = short_error(e)
    if not wheels:
        return None, f"not installed ({missing}) and no --wheels: its rows are skipped"
    if not Path(wheels).is_dir():
        return None, f"--wheels {wheels} does not exist: carry the parts first (docs/gpu.md)"
    t0 = time.perf_counter()
    what = install_wheels(Path(wheels), site)
    use_site(site)
    import nvidia.dali as dali
    return dali.__version__, f"from {what} in {wheels} into {site} ({time.perf_counter() - t0:.0f} s)"


# -- rows ---------------------------------------------------------------------------------------

def device_row(device: torch.device) -> tuple[str, str]:
    import platform

    from train.hardware import machine_header

    when = time.strftime("%Y-%m-%d %H:%M %Z")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        name = f"{p.name} (sm {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB) x{torch.cuda.device_count()}"
        return name, f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}, {when}"
    return "cpu", f"{machine_header()}, Python {platform.python_version()}, {when}"


def pytest_row(t: Table, timeout: float) -> tuple[str, str]:
    """`pytest -m gpu` in a child; its summary line and the names of failing tests."""
    r = t.spawn([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                name="pytest", timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)",
                                                       (r.stdout.strip().splitlines() or [""])[-1]))
    failed = [ln.split(" ", 1)[1].split(" - ")[0] for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    skips = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    if not counts:
        raise RuntimeError(f"pytest exit {r.returncode}: {tail(r.stdout)}")
    value = ", ".join(f"{n} {k}" for k, n in counts.items())
    detail = ("failing: " + "; ".join(f.split("::")[-1] for f in failed)) if failed else (
        f"exit {r.returncode}" + (f"; {tail(skips[0], 1)[:120]}" if skips else ""))
    return ("FAILED " if r.returncode not in (0, 5) else "") + value, detail


def demo_row(t: Table, a, dali_version: str | None) -> tuple[str, str]:
    """configs/fashion_mnist_resnet.yaml on shapes-10 through train/main.py under torchrun: the
    DALI loader (GPU decoding on CUDA), amp auto, EMA, global batch 256 (2 micro-batches of 128 on
    one GPU), an async checkpoint mid-epoch 2 (train.max_steps), then a resume to the end."""
    make_jpegs(a.work / "shapes10", "shapes", classes=10, train_per_class=a.demo_train, val_per_class=a.demo_val,
               workers=a.workers)
    runs = a.work / "runs"
    shutil.rmtree(runs / "demo", ignore_errors=True)
    ranks = max(1, min(2, torch.cuda.device_count())) if a.device.type == "cuda" else 1
    gb = a.demo_global_batch
    steps_per_epoch = 10 * a.demo_train // gb
    total = 2 * steps_per_epoch
    cut = max(1, min(total - 1, round(total * 0.6)))  # mid-epoch 2
    loader = "dali" if dali_version else "torch"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "train/main.py",
           "--config", "configs/fashion_mnist_resnet.yaml", f"data.root={a.work / 'shapes10'}",
           f"data.loader={loader}", f"data.workers={min(4, a.workers)}", f"data.global_batch={gb}",
           "train.epochs=2", "train.eval_every=2", "train.amp=auto", f"optim.ema_decay={a.demo_ema}",
           "checkpoint.async_save=true", f"log.dir={runs}", "log.name=demo", "log.progress=lines",
           "log.tensorboard=false", f"dist.device={a.device.type}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    first = t.spawn([*cmd, f"train.max_steps={cut}"], name="demo-run1", timeout=a.demo_timeout, env=env)
    if first.returncode != 0:
        raise RuntimeError(f"run 1 exit {first.returncode}: {tail(first.stdout)}")
    t1 = time.perf_counter()
    second = t.spawn(cmd, name="demo-run2", timeout=a.demo_timeout, env=env)
    if second.returncode != 0:
        raise RuntimeError(f"run 2 (resume) exit {second.returncode}: {tail(second.stdout)}")
    t2 = time.perf_counter()
    resumed = re.search(r"resumed from \S*step_(\d+)", second.stdout)
    amp = re.search(r"\] amp (\w+)", first.stdout)
    s = json.loads((runs / "demo/summary.json").read_text())
    problems = []
    if not resumed or int(resumed.group(1)) != cut:
        problems.append(f"run 2 did not resume from step_{cut}")
    if s["steps"] != total or s["epochs"] != 2:
        problems.append(f"{s['steps']} steps / {s['epochs']} epochs, expected {total} / 2")
    bar = a.demo_train >= DEMO_BAR_MIN_PER_CLASS
    if bar and s["final_top1"] < DEMO_BAR:
        problems.append(f"top-1 below the {DEMO_BAR:.0f} % bar")
    value = f"{s['final_top1']:.2f} % top-1 (EMA {s.get('final_ema_top1', float('nan')):.2f} %)"
    verdict = f"bar >= {DEMO_BAR:.0f} %: {'FAIL' if problems else 'ok'}" if bar else "no bar at this size"
    detail = (f"{verdict}; "
              f"shapes-10 {10 * a.demo_train}/{10 * a.demo_val} imgs, {loader}, amp {amp.group(1) if amp else '?'}, "
              f"{ranks} rank(s), {total} steps, async ckpt step_{cut} + resume; {t1 - t0:.0f}+{t2 - t1:.0f} s")
    if problems:
        return "FAILED " + value, "; ".join(problems) + "; " + detail
    return value, detail


def _syncbn_rank(rank: int, world: int, port: int, backend: str, cuda: bool, model: str, batch: int, size: int,
                 steps: int, queue) -> None:
    """One of 2 ranks: SyncBN agreement (torch's on CUDA, ours anywhere) and cost per step."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import datetime
        device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)  # before the group: NCCL's barrier uses the current device
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        out = {"agree": syncbn_agreement(rank, world, device), **syncbn_cost(device, model, batch, size, steps)}
        queue.put((rank, out, None))
    except BaseException:  # noqa: BLE001 - reported by the parent
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def syncbn_agreement(rank: int, world: int, device: torch.device) -> dict[str, float]:
    """Max |difference| between 2-rank cross-rank BN (each rank half the batch) and plain BN on the
    whole batch, over outputs, input gradients, weight/bias gradients (summed over ranks, as DDP
    does) and running statistics: for torch's SyncBatchNorm (CUDA only) and ours."""
    import torch.distributed as dist
    from torch import nn

    from train.sync_batchnorm import CrossRankBatchNorm2d

    g = torch.Generator().manual_seed(0)
    n, c = 16, 32
    x = (torch.randn(n, c, 12, 12, generator=g) * 3 + 1).to(device)
    w = torch.randn(n, c, 12, 12, generator=g).to(device)
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g) - 0.5

    def run(bn, xs, ws):
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        xs = xs.clone().requires_grad_(True)
        y = bn(xs)
        (y * ws).sum().backward()
        return [y.detach(), xs.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]

    ref = run(nn.BatchNorm2d(c).to(device), x, w)
    lo, hi = rank * n // world, (rank + 1) * n // world
    kinds = {"ours": CrossRankBatchNorm2d}
    if device.type == "cuda":
        kinds = {"torch": nn.SyncBatchNorm, **kinds}
    diffs = {}
    for name, cls in kinds.items():
        y, gx, gw, gb, rm, rv = run(cls(c).to(device), x[lo:hi], w[lo:hi])
        parts = [[torch.empty_like(y) for _ in range(world)], [torch.empty_like(gx) for _ in range(world)]]
        dist.all_gather(parts[0], y.contiguous())
        dist.all_gather(parts[1], gx.contiguous())
        for p in (gw, gb):
            dist.all_reduce(p)
        got = [torch.cat(parts[0]), torch.cat(parts[1]), gw, gb, rm, rv]
        diffs[name] = max((a - b).abs().max().item() for a, b in zip(got, ref))
    return diffs


def syncbn_cost(device: torch.device, model_name: str, batch: int, size: int, steps: int) -> dict[str, float]:
    """ms of one forward + backward of the model at `batch` per rank with plain BN and with
    cross-rank BN (train/sync_batchnorm.convert: torch's SyncBatchNorm on CUDA), best of two
    interleaved rounds; on CUDA also the host syncs of one SyncBN step (sync debug mode)."""
    import copy

    import torch.distributed as dist

    from train import models, sync_batchnorm
    from train.config import ModelConfig
    from train.trainer import autocast

    torch.manual_seed(0)
    plain = models.build(ModelConfig(name=model_name), 100).to(device, memory_format=torch.channels_last)
    synced = sync_batchnorm.convert(copy.deepcopy(plain), device).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"

    def step(m):
        with autocast(device, amp):
            loss = m(x).float().square().mean()
        loss.backward()

    times: dict[str, list[float]] = {"plain": [], "sync": []}
    for _ in range(2):
        for name, m in (("plain", plain), ("sync", synced)):
            step(m)
            sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(m)
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps * 1000)
            dist.barrier()
    out = {k: min(v) for k, v in times.items()}
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(synced)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out["syncs"] = sum(SYNC_WARNING in str(w.message) for w in caught)
    return out


def spawn_ranks(t: Table, fn, world: int, *args, timeout: float) -> list:
    """fn(rank, world, port, *args, queue) on `world` spawned processes; results in rank order."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=fn, args=(r, world, port, *args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + max(5.0, min(timeout, t.hard_s - t.elapsed() - 20))
    try:
        for _ in range(world):
            rank, value, err = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            if err:
                raise RuntimeError(f"rank {rank}: {err.strip().splitlines()[-1]}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def syncbn_rows(t: Table, a) -> None:
    """2 ranks: over NCCL on 2 GPUs, over gloo as two processes on one GPU, over gloo on the CPU."""
    gpus = torch.cuda.device_count() if a.device.type == "cuda" else 0
    backend = "nccl" if gpus >= 2 else "gloo"
    where = {0: "2 CPU processes, gloo", 1: "2 processes on 1 GPU, gloo"}.get(gpus, "2 GPUs, NCCL")
    results = []

    def agree():
        results.extend(spawn_ranks(t, _syncbn_rank, 2, backend, gpus > 0, a.model, a.syncbn_batch, a.size,
                                   a.syncbn_steps, timeout=a.syncbn_timeout))
        d = results[0]["agree"]
        ok = max(d.values()) <= 1e-4
        value = ", ".join(f"{k} {v:.1e}" for k, v in d.items())
        detail = (f"max |diff| vs plain BN on the 2x8 batch (out, grads, running stats), bar 1e-4: "
                  f"{'ok' if ok else 'FAIL'}; {where}" + ("" if "torch" in d else "; torch SyncBatchNorm: CUDA only"))
        return ("" if ok else "FAILED ") + value, detail

    def cost():
        if not results:
            raise RuntimeError("the 2-rank run failed (previous row)")
        r = results[0]
        extra = r["sync"] - r["plain"]
        syncs = f"; {r['syncs']} host syncs per SyncBN step (torch's SyncBN reads counts back per layer)" \
            if "syncs" in r else ""
        return (f"+{extra:.1f} ms (+{100 * extra / r['plain']:.0f} %)",
                f"{a.model} fwd+bwd at {a.syncbn_batch}/rank {a.size}px: plain BN {r['plain']:.1f} ms, "
                f"cross-rank {r['sync']:.1f} ms; {where}{syncs}")

    t.run("syncbn_agree", agree, need_s=20)
    t.run("syncbn_cost", cost)


def bench_config(a, loader: str, *, amp: str = "auto", compiled: bool = False, name: str = "bench", **data):
    """The trainer's config for a throughput row: the ImageNet-like data, a.model, channels_last."""
    from train.config import Config

    cfg = Config()
    cfg.data = dataclasses.replace(cfg.data, **{**dict(root=str(a.work / "imagenet"), loader=loader, batch_size=a.batch,
                                                      train_crop=a.size, val_resize=a.size * 8 // 7, val_crop=a.size,
                                                      workers=a.workers), **data})
    cfg.model = dataclasses.replace(cfg.model, name=a.model, channels_last=True, compile="on" if compiled else "off")
    cfg.train = dataclasses.replace(cfg.train, amp=amp, epochs=1000, resume="off")
    cfg.log = dataclasses.replace(cfg.log, dir=str(a.work / "runs"), name=name, tensorboard=False, progress="off",
                                  grad_norm_every=0, images=False, feature_maps=False, graph=False)
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, every_epochs=10**6, async_save=False)
    cfg.dist = dataclasses.replace(cfg.dist, device=a.device.type)
    return cfg


@contextlib.contextmanager
def built_run(cfg, device: torch.device):
    """A Run of train/trainer.py for `cfg` on one rank; closed (loaders, memory) afterwards."""
    from train.distributed import DistInfo
    from train.trainer import StopSignal, build_run

    info = DistInfo(0, 1, 0, torch.device("cuda", 0) if device.type == "cuda" else device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run = build_run(cfg, info, StopSignal())
    try:
        yield run
    finally:
        with contextlib.suppress(Exception):
            run.checkpointer.close()
        with contextlib.suppress(Exception):
            run.monitor.close()
        for loader in (run.train_loader, run.val_loader):
            close = getattr(getattr(loader, "loader", loader), "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        del run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_steps(run, steps: int, on_flush=None) -> None:
    """train/trainer.py's step loop (train_epoch) for `steps` optimizer steps from where the run
    stands, epoch after epoch without evaluating or saving. `on_flush(step, when)` at each metric
    flush, right after its reduction (the loop's one host sync), `when` = "before" and "after" the
    monitor logs it (through Monitor.log_train, the flush's one call out)."""
    from train.trainer import train_epoch

    state = run.state
    run.cfg.train.max_steps = state.step + steps
    log_train = run.monitor.log_train

    def hooked(st, metrics):
        if on_flush is not None:
            on_flush(st.step, "before")
        log_train(st, metrics)
        if on_flush is not None:
            on_flush(st.step, "after")
    run.monitor.log_train = hooked
    try:
        while True:
            run.train_loader.set_epoch(state.epoch, state.sample_in_epoch)
            if train_epoch(run) == "max_steps":
                return
            state.epoch, state.sample_in_epoch = state.epoch + 1, 0
    finally:
        run.monitor.log_train = log_train


def throughput(a, loader: str, *, amp: str = "auto", compiled: bool = False) -> tuple[str, str]:
    """img/s of the trainer's step loop between two metric flushes `a.steps` steps apart, after
    `a.warmup` steps (compilation, cudnn autotuning, loader start-up)."""
    cfg = bench_config(a, loader, amp=amp, compiled=compiled, name=f"bench_{loader}")
    cfg.log = dataclasses.replace(cfg.log, every=a.warmup)  # a flush (the loop's own sync) ends the warmup
    marks: dict[int, float] = {}
    with built_run(cfg, a.device) as run:
        t0 = time.perf_counter()
        run_steps(run, a.warmup + a.steps, on_flush=lambda step, when: marks.setdefault(step, time.perf_counter()))
        rate = a.steps * run.plan.global_batch / (marks[a.warmup + a.steps] - marks[a.warmup])
        t_warm = marks[a.warmup] - t0
        mem = max(peak_memory(a.device), run.monitor.peak_memory_gib)  # the monitor resets CUDA's peak
        chosen = run.plan.amp
    a.peaks.append((mem, f"{loader}{' compiled' if compiled else ''} amp {chosen}"))
    return (f"{rate:,.0f} img/s",
            f"{a.model} b{a.batch} {a.size}px channels_last amp {amp}->{chosen}"
            f"{' TF32' if chosen == 'off' and a.device.type == 'cuda' else ''}, {a.steps} steps after {a.warmup} "
            f"({t_warm:.0f} s{' incl. compile' if compiled else ''}); peak {mem_text(mem)}")


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, the process's peak RSS


def mem_text(gib: float) -> str:
    return f"{gib:.1f} GiB"


def pipeline_rate(a, loader: str, **data) -> tuple[str, str]:
    """img/s of the train loader alone (decode, augment, normalise, on the device), after warmup."""
    from data import build_loaders
    from train.distributed import DistInfo

    cfg = bench_config(a, loader, **data)
    info = DistInfo(0, 1, 0, torch.device("cuda", 0) if a.device.type == "cuda" else a.device)
    train, val, _ = build_loaders(cfg.data, info, seed=0, channels_last=True)
    try:
        n, t0, epoch = 0, None, 0
        while n < a.warmup + a.steps:
            train.set_epoch(epoch)
            for _ in train:
                n += 1
                if n == a.warmup:
                    sync(a.device)
                    t0 = time.perf_counter()
                if n == a.warmup + a.steps:
                    break
            epoch += 1
        sync(a.device)
        rate = a.steps * a.batch / (time.perf_counter() - t0)
    finally:
        for ld in (train, val):
            with contextlib.suppress(Exception):
                ld.close()
        del train, val
        gc.collect()
    return rate, f"b{a.batch} {a.size}px, {a.workers} workers/threads"


def count_syncs(cfg, device: torch.device, window: int = 4) -> tuple[list, list]:
    """Host syncs between two metric flushes of train/trainer.py's step loop for `cfg` (one rank):
    (those in the `window` steps, those in the flush that ends them: its reduction is the loop's
    one intended sync). Each hit is (file, line, function). On CUDA, set_sync_debug_mode("warn")
    warns on each synchronizing call, the loader's included (a sync there stalls the host as
    well). On the CPU, where nothing syncs, aten._local_scalar_dense (item/bool of a tensor)
    outside the loader stands in (the loader's host-side decode reads CPU tensors by design;
    tests/test_host_sync.py is the full CPU guard)."""
    cfg.log = dataclasses.replace(cfg.log, every=window)
    counter = SyncDebugCounter() if device.type == "cuda" else DispatchCounter()

    def on_flush(step, when):  # from after flush 2's logging to flush 3's reduction: `window` steps
        if (step, when) == (2 * window, "after"):  # two windows of warmup: cudnn autotuning, loader start
            counter.start()
        elif (step, when) == (3 * window, "before"):
            counter.stop()
    with built_run(cfg, device) as run:
        if device.type == "cpu":
            run.train_loader = PausingLoader(run.train_loader, counter)
        try:
            run_steps(run, 4 * window, on_flush=on_flush)
        finally:
            counter.stop()
    in_flush = [h for h in counter.hits if h[2] in FLUSH_FUNCTIONS and h[0] == "trainer.py"]
    return [h for h in counter.hits if h not in in_flush], in_flush


def host_sync_row(a, loader: str) -> tuple[str, str]:
    """count_syncs over the real loop with EMA, MixUp/CutMix and 2 micro-batches per step."""
    window = 4
    cfg = bench_config(a, loader, name="host_syncs", mixup_alpha=0.2, cutmix_alpha=1.0,
                       batch_size=max(2, a.batch // 4))
    cfg.optim = dataclasses.replace(cfg.optim, ema_decay=0.999, accumulate=2)
    in_step, in_flush = count_syncs(cfg, a.device, window)
    where = ", ".join(f"{f}:{ln} {fn} x{n}" for (f, ln, fn), n in Counter(in_step).most_common(3))
    what = "CUDA syncs (set_sync_debug_mode)" if a.device.type == "cuda" else "would-be syncs (CPU: item/bool)"
    return (f"{len(in_step) / window:g}",
            f"{what}: {len(in_step)} in {window} steps + {len(in_flush)} in the flush ending them; {loader} loader, "
            f"EMA, MixUp/CutMix, accumulate 2" + (f"; at {where}" if where else ""))


FLUSH_FUNCTIONS = ("flush", "reduce")  # train/trainer.py: the metric flush and its Sums.reduce


def enclosing_function(filename: str, lineno: int) -> str:
    """The name of the `def` that holds line `lineno` of `filename` ('?' if unknown)."""
    import linecache

    line = linecache.getline(filename, lineno)
    indent = len(line) - len(line.lstrip())
    for k in range(lineno - 1, 0, -1):
        text = linecache.getline(filename, k)
        m = re.match(r"(\s*)(?:async\s+)?def (\w+)", text)
        if m and len(m.group(1)) < indent:
            return m.group(2)
    return "?"


class SyncDebugCounter:
    """torch.cuda.set_sync_debug_mode("warn") between start and stop; `hits`: (file, line,
    function) of each synchronizing call."""

    def __init__(self):
        self.hits: list[tuple[str, int, str]] = []
        self._ctx = None

    def start(self) -> None:
        torch.cuda.synchronize()
        self._ctx = warnings.catch_warnings(record=True)
        self._caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        if self._ctx is None:
            return
        torch.cuda.set_sync_debug_mode(0)
        self._ctx.__exit__(None, None, None)
        self.hits += [(Path(w.filename).name, w.lineno, enclosing_function(w.filename, w.lineno))
                      for w in self._caught if SYNC_WARNING in str(w.message)]
        self._ctx = None


class DispatchCounter:
    """The CPU stand-in: aten._local_scalar_dense calls between start and stop (this thread),
    except while `paused`."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        hits = self.hits = []
        self.paused = False
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default and not counter.paused:
                    frame = next((f for f in reversed(traceback.extract_stack()[:-1])
                                  if f"{os.sep}torch{os.sep}" not in f.filename), None)
                    hits.append((Path(frame.filename).name, frame.lineno, frame.name) if frame else ("?", 0, "?"))
                return func(*args, **(kwargs or {}))
        self.mode, self.on = Mode(), False

    def start(self) -> None:
        self.mode.__enter__()
        self.on = True

    def stop(self) -> None:
        if self.on:
            self.mode.__exit__(None, None, None)
            self.on = False


class PausingLoader:
    """The train loader with the CPU counter paused while it makes a batch."""

    def __init__(self, loader, counter: DispatchCounter):
        self.loader, self.counter = loader, counter

    def __iter__(self):
        it = iter(self.loader)
        while True:
            self.counter.paused = True
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.counter.paused = False
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


# -- the call -------------------------------------------------------------------------------------

DEFAULTS = {  # per device: (GPU: the acceptance call, <= 8 min on one H100) | (CPU: the CI's smoke size)
    "model": ("resnet50", "resnet18"), "batch": (256, 8), "size": (224, 64), "steps": (30, 3), "warmup": (10, 2),
    "classes": (100, 40), "train_per_class": (100, 3), "val_per_class": (10, 1),
    "demo_train": (6000, 40), "demo_val": (1000, 10), "demo_global_batch": (256, 64), "demo_ema": (0.99, 0.9),
    "syncbn_batch": (32, 4), "syncbn_steps": (10, 2),
    "budget": (450.0, 240.0), "hard_limit": (570.0, 900.0),
    "pytest_timeout": (240.0, 240.0), "demo_timeout": (240.0, 240.0), "syncbn_timeout": (150.0, 240.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--wheels", help="folder with the carried wheel parts (chunk.* + manifest.json) or *.whl")
    p.add_argument("--site", default="/tmp/site", help="where carried wheels are unpacked")
    p.add_argument("--work", default="/tmp/resnet-gpu", help="generated data and runs")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="decode processes/threads")
    p.add_argument("--rows", default="", help="comma-separated row keys to run (default: all)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--out", help="also write the table to OUT/table.txt (on the device: $OUT)")
    p.add_argument("--stage", metavar="DIR", help="stage the wheels for the device into DIR here and exit")
    p.add_argument("--python", default="3.12", help="--stage: the device's Python version")
    for k, (gpu, _) in DEFAULTS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(gpu), default=None, help=f"default {gpu} on cuda")
    a = p.parse_args(argv)
    for k, (gpu, cpu) in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, gpu if a.device == "cuda" else cpu)
    a.work = Path(a.work)
    return a


def stage_main(out: Path, python: str) -> None:
    parts = stage(out, python)
    size = sum(f.stat().st_size for p in parts for f in p.iterdir())
    print(f"staged {len(parts)} parts under {out} ({size / 2**20:.0f} MiB); device calls, back to back:")
    for i, part in enumerate(parts, 1):
        rel = part.relative_to(ROOT) if part.is_relative_to(ROOT) else part
        cmd = f"mkdir -p /tmp/gpuw && cp {rel}/* /tmp/gpuw/ && "
        cmd += ("ls -la /tmp/gpuw" if i < len(parts) else
                'python3 benchmarks/gpu.py --wheels /tmp/gpuw --out "$OUT" 2> "$OUT/progress.log"')
        print(f"  call {i}: carry [\"{rel}\"]  timeout_s {600 if i == len(parts) else 120}  command: {cmd}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.stage:
        stage_main(Path(a.stage).resolve(), a.python)
        return 0
    a.device = torch.device(a.device)
    a.peaks = []
    a.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_CACHE_HOME", str(a.work / "cache"))  # the amp probe's and preflight's caches
    import logging
    logging.getLogger("resnet").setLevel(logging.WARNING)
    header = f"benchmarks/gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    t = Table(a.budget, a.hard_limit, header, Path(a.out) if a.out else None)
    t.watchdog()
    selected = set(filter(None, a.rows.split(",")))
    unknown = selected - set(LABELS)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; rows: {', '.join(LABELS)}")

    def unless(key: str, *, dali: bool = False, cuda: bool = False) -> str | None:
        if selected and key not in selected:
            return "not in --rows"
        if cuda and a.device.type != "cuda":
            return "CUDA only"
        if dali and not dali_version:
            return f"no DALI: {t.rows['dali'][1]}"
        return None

    cuda_missing = a.device.type == "cuda" and not torch.cuda.is_available()
    dali_version = None
    try:
        if cuda_missing:
            t.set("env", "FAILED", "no CUDA device visible (torch.cuda.is_available() is False); "
                                   "--device cpu runs the same rows on the CPU")
        else:
            t.run("env", lambda: device_row(a.device))

        def dali():
            nonlocal dali_version
            dali_version, how = ensure_dali(a.wheels, Path(a.site))
            return (dali_version or "missing"), how
        t.run("dali", dali)
        if cuda_missing:
            return 2

        def data():
            r = make_jpegs(a.work / "imagenet", "imagenet", classes=a.classes, train_per_class=a.train_per_class,
                           val_per_class=a.val_per_class, workers=a.workers)
            return (f"{r['mean_kib']:.0f} KiB mean (ImageNet ~110)",
                    f"{r['classes']} classes, {r['classes'] * r['train_per_class']} train / "
                    f"{r['classes'] * r['val_per_class']} val, 500x375 q90, procedural (benchmarks/gpu.py "
                    f"natural_image), made in {r['seconds']:.0f} s")
        t.run("data", data)
        no_data = None if t.rows["data"][0] != "FAILED" else "no data (row above)"
        t.run("pytest", lambda: pytest_row(t, a.pytest_timeout), need_s=30, unless=unless("pytest"))
        t.run("demo", lambda: demo_row(t, a, dali_version), need_s=40, unless=unless("demo"))
        if not (selected and not selected & {"syncbn_agree", "syncbn_cost"}):
            syncbn_rows(t, a)
        for key, loader, amp in (("train_synthetic", "synthetic", "auto"), ("train_synthetic_fp32", "synthetic", "off"),
                                 ("train_dali", "dali", "auto"), ("train_torch", "torch", "auto")):
            t.run(key, lambda loader=loader, amp=amp: throughput(a, loader, amp=amp), need_s=15,
                  unless=unless(key, dali=loader == "dali") or (no_data if loader != "synthetic" else None))
        base = {}

        def pipe(key, loader, **data):
            rate, detail = pipeline_rate(a, loader, **data)
            base.setdefault(loader, rate)
            if key == "pipe_dali_aug" and "dali" in base and base["dali"] != rate:
                cost = (1 / rate - 1 / base["dali"]) * 1e6
                detail = f"+{cost:.0f} us/img vs RRC+flip (TrivialAugment wide, erasing 0.25); {detail}"
            return f"{rate:,.0f} img/s", detail
        t.run("pipe_dali", lambda: pipe("pipe_dali", "dali"), need_s=10,
              unless=unless("pipe_dali", dali=True) or no_data)
        t.run("pipe_dali_aug", lambda: pipe("pipe_dali_aug", "dali", auto_augment="trivial_augment",
                                            random_erasing=0.25), need_s=10,
              unless=unless("pipe_dali_aug", dali=True) or no_data)
        t.run("pipe_torch", lambda: pipe("pipe_torch", "torch"), need_s=10, unless=unless("pipe_torch") or no_data)
        t.run("host_syncs", lambda: host_sync_row(a, "dali" if dali_version else "torch"), need_s=15,
              unless=unless("host_syncs") or no_data)
        for key, loader in (("train_synthetic_compiled", "synthetic"), ("train_dali_compiled", "dali"),
                            ("train_torch_compiled", "torch")):
            t.run(key, lambda loader=loader: throughput(a, loader, compiled=True), need_s=60,
                  unless=unless(key, dali=loader == "dali") or ("--no-compile" if a.no_compile else None)
                  or (no_data if loader != "synthetic" else None))

        def peak():
            if not a.peaks:
                raise RuntimeError("no train row ran")
            mem, where = max(a.peaks)
            what = "torch max_memory_allocated" if a.device.type == "cuda" else "process peak RSS (CPU)"
            return mem_text(mem), f"{what}, at: {where}"
        t.run("peak_mem", peak, unless=unless("peak_mem"))
    finally:
        t.print()
    failed = [k for k, (v, _) in t.rows.items() if v.startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
