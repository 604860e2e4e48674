"""Dataset preflight: find the files that would stop a run before the run starts.

ImageNet's train split is known to hold a CMYK JPEG or so, a PNG named .JPEG and some grayscale
JPEGs; all decode fine when the decoder is asked for RGB (grayscale as 3 equal channels), so they
are only reported. Zero-byte, truncated and non-image files are unusable: the torch loader
replaces each by the next readable file on the fly, but a DALI pipeline would raise mid-epoch,
so the DALI loader plans the same replacement up front from a cached check (`cached_check`,
used by `data.folder.FolderSplit.find_unusable`).

    python -m data.preflight /data/imagenet        # exit 1 if any file is unusable
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# What the loaders read (torchvision's IMG_EXTENSIONS); other files (manifests, synsets) are ignored.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
UNUSABLE = ("zero_byte", "truncated", "non_image")
WARNINGS = ("cmyk", "png_as_jpeg", "grayscale")


@dataclass
class Report:
    """Paths by problem; `unusable` files cannot be decoded, the warnings decode as RGB."""

    total: int = 0
    zero_byte: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # also unreadable / corrupt
    non_image: list[str] = field(default_factory=list)
    cmyk: list[str] = field(default_factory=list)
    png_as_jpeg: list[str] = field(default_factory=list)
    grayscale: list[str] = field(default_factory=list)  # one channel: decoded as 3 equal ones

    @property
    def unusable(self) -> set[str]:
        return {p for kind in UNUSABLE for p in getattr(self, kind)}

    def summary(self, show: int = 20) -> str:
        lines = [f"{self.total} images, {len(self.unusable)} unusable"]
        for kind in UNUSABLE + WARNINGS:
            paths = getattr(self, kind)
            tag = "error" if kind in UNUSABLE else "warning"
            lines.append(f"  {kind}: {len(paths)}" + (f" ({tag})" if paths else ""))
            lines += [f"    {p}" for p in paths[:show]]
            if len(paths) > show:
                lines.append(f"    ... and {len(paths) - show} more")
        return "\n".join(lines)


def check(path: str, data: bytes | None = None) -> str | None:
    """The problem of one file (a Report field name), or None if it is a plain RGB/gray image.
    `data` is the file's content when the caller has read it already (data.pack reads once)."""
    try:
        if data is None:
            data = Path(path).read_bytes()
        if not data:
            return "zero_byte"
        head = data[:8]
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and checksums, without decoding
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: catches truncated entropy-coded data
            mode = im.mode
    except UnidentifiedImageError:
        return "non_image"
    except Exception:  # noqa: BLE001 - OSError, SyntaxError, ValueError...: all mean "cannot decode"
        return "truncated"
    if head.startswith(JPEG_MAGIC) and mode == "CMYK":
        return "cmyk"
    if head.startswith(PNG_MAGIC) and Path(path).suffix.lower() in (".jpg", ".jpeg"):
        return "png_as_jpeg"
    if mode in ("L", "LA", "1", "I", "I;16"):
        return "grayscale"
    return None


def list_images(root: Path) -> list[str]:
    """Every file the loaders would read under `root`, sorted."""
    return sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def check_files(paths: list[str], workers: int = 0) -> Report:
    """Decode every file in a thread pool (PIL releases the GIL while decoding)."""
    report = Report(total=len(paths))
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for path, problem in zip(paths, pool.map(check, paths, chunksize=64)):
            if problem:
                getattr(report, problem).append(path)
    return report


def scan(root: str | Path, workers: int = 0) -> Report:
    """Check every image file under `root`."""
    return check_files(list_images(Path(root)), workers)


def _fingerprint(paths: list[str], workers: int) -> str:
    """Changes when a file is added, removed, rewritten or resized."""
    def stat(p):
        s = os.stat(p)
        return f"{p}\0{s.st_size}\0{s.st_mtime_ns}\n"

    h = hashlib.sha1()
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for line in pool.map(stat, paths, chunksize=256):
            h.update(line.encode())
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet-train" / "preflight"


def cached_check(paths: list[str], workers: int = 0) -> Report:
    """`check_files`, remembered per file list (keyed by paths, sizes and mtimes) so a full
    ImageNet decode pass runs once per dataset, not once per run; the ranks of a node share it
    through a file lock instead of each decoding everything."""
    fp = _fingerprint(paths, workers)
    cache = cache_dir() / f"{fp}.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cache.exists():
            return Report(**json.loads(cache.read_text()))
        report = check_files(paths, workers)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(report)))
        tmp.replace(cache)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Find zero-byte, truncated, non-image, CMYK, PNG-as-JPEG and grayscale files.")
    p.add_argument("root", type=Path)
    p.add_argument("--workers", type=int, default=0, help="decode threads (default: all CPUs)")
    p.add_argument("--show", type=int, default=20, help="paths listed per problem")
    args = p.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report = scan(args.root, args.workers)
    print(f"preflight {args.root} ({time.perf_counter() - t0:.1f}s): {report.summary(args.show)}")
    return 1 if report.unusable else 0


if __name__ == "__main__":
    sys.exit(main())
