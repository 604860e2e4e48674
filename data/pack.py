"""Pack an ImageNet-style dataset into a few large tar shards plus an index (data/packed.py).

    python -m data.pack /data/imagenet /data/imagenet-packed               # 1 GiB shards
    python -m data.pack /data/imagenet /data/in-packed --max-side 500 --quality 90
    python -m data.pack ILSVRC/Data/CLS-LOC /data/in-packed --val-labels LOC_val_solution.csv

The input is `<root>/{train,val}/<class>/<image>`, or Kaggle's download with a flat `val/`
and `LOC_val_solution.csv` (found beside the splits or up to three folders above them; the
`data.prepare imagenet-val` reader). Samples keep the folder loader's order (classes sorted,
then file names), so a packed copy and the folder read the same sample at the same index.

Every file is read once and checked like `data.preflight` on the way: unusable ones (zero-byte,
truncated, not an image) are left out and listed in `report.json` beside the index, with their
counts in `index.json`. `--max-side N` re-encodes images whose longer side exceeds N as JPEGs of
`--quality` (FFCV's trick: smaller JPEGs decode faster); it is off by default and recorded in
the index. The pack is written under `<out>.partial` and renamed when complete, so an interrupted
pack never looks finished; running the same command again on unchanged input does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data import DataError, preflight
from data.folder import scan
from data.packed import FORMAT, INDEX
from data.prepare import labelled_val_files

SPLITS = ("train", "val")
VAL_LABELS = "LOC_val_solution.csv"
UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KIB": 2**10, "M": 10**6, "MB": 10**6, "MIB": 2**20,
         "G": 10**9, "GB": 10**9, "GIB": 2**30, "T": 10**12, "TB": 10**12, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '100MB', '4096' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 1GiB, 512MiB or 100MB")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


# --- the input ---------------------------------------------------------------------------------

def find_val_labels(root: Path) -> Path | None:
    for folder in (root / "val", root, *list(root.resolve().parents)[:3]):
        if (folder / VAL_LABELS).is_file():
            return folder / VAL_LABELS
    return None


def flat_val(val_dir: Path, labels_file: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) of a flat ILSVRC2012 val folder, in the order `data.folder.scan` reads the
    same images once `data.prepare imagenet-val` has sorted them into class folders."""
    labels = labelled_val_files(val_dir, labels_file)
    unknown = sorted(set(labels.values()) - set(classes))
    if unknown:
        raise DataError(f"{labels_file}: {len(unknown)} classes not among the train class folders, e.g. {unknown[:3]}")
    where = {c: i for i, c in enumerate(classes)}
    rows = sorted((w, name) for name, w in labels.items())
    return [(str(val_dir / name if (val_dir / name).exists() else val_dir / w / name), where[w]) for w, name in rows]


def source_splits(root: Path, val_labels: Path | None) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """The class names and each split's (path, label) samples, in the folder loader's order."""
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"{root / split}: not a folder (expected <root>/{split}/<class>/<image>)")
    train = scan(root / "train")
    if not train.classes:
        raise DataError(f"{root / 'train'}: no class folders")
    samples = {"train": train.samples}
    if any(p.is_dir() for p in (root / "val").iterdir()) and val_labels is None:
        val = scan(root / "val")
        if val.classes != train.classes:
            raise DataError(f"{root}: the class folders of val/ differ from train/")
        samples["val"] = val.samples
    else:
        val_labels = val_labels or find_val_labels(root)
        if val_labels is None:
            raise DataError(f"{root / 'val'}: flat (no class folders) and no {VAL_LABELS} found near it; "
                            "pass --val-labels")
        samples["val"] = flat_val(root / "val", val_labels, train.classes)
    return train.classes, samples


def fingerprint(samples: dict[str, list[tuple[str, int]]], options: dict, workers: int) -> str:
    """Changes when a file is added, removed, relabelled, rewritten or resized, or an option changes."""
    def stat(item):
        s = os.stat(item[0])
        return f"{item[0]}\0{item[1]}\0{s.st_size}\0{s.st_mtime_ns}\n"

    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    with ThreadPoolExecutor(workers) as pool:
        for split in SPLITS:
            h.update(f"[{split}]\n".encode())
            for line in pool.map(stat, samples[split], chunksize=256):
                h.update(line.encode())
    return h.hexdigest()


# --- reading, checking, re-encoding --------------------------------------------------------------

def load(path: str, max_side: int, quality: int) -> tuple[str | None, bytes | None, bool]:
    """(preflight problem, bytes to store or None if unusable, re-encoded?) of one file."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return "truncated", None, False  # unreadable: preflight's name for "cannot decode"
    problem = preflight.check(path, data)
    if problem in preflight.UNUSABLE:
        return problem, None, False
    if max_side:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > max_side:
                scale = max_side / max(im.size)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                im = im.convert("L" if im.mode in ("L", "LA", "1", "I", "I;16") else "RGB")
                out = io.BytesIO()
                im.resize(size, Image.LANCZOS).save(out, format="JPEG", quality=quality)
                return problem, out.getvalue(), True
    return problem, data, False


def ordered(pool: ThreadPoolExecutor, fn, items, window: int):
    """pool.map that keeps at most `window` results in flight (1.28 M files do not fit in memory)."""
    items, ahead = iter(items), deque()
    for item in items:
        ahead.append(pool.submit(fn, item))
        if len(ahead) >= window:
            yield ahead.popleft().result()
    while ahead:
        yield ahead.popleft().result()


# --- writing ------------------------------------------------------------------------------------

def tar_key(relative: str) -> str:
    """WebDataset key of a sample: its path without the extension, dots made underscores (a
    WebDataset key ends at the first dot of the file name)."""
    parent, _, name = relative.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{parent}/{stem.replace('.', '_')}" if parent else stem.replace(".", "_")


def extension(path: str, reencoded: bool) -> str:
    ext = "jpg" if reencoded else Path(path).suffix.lower().lstrip(".")
    return {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext) or "jpg"


class ShardWriter:
    """Appends tar members (ustar headers from tarfile) and knows where each member's data
    starts; mtime, owner and mode are fixed, so the same input gives the same bytes."""

    def __init__(self, path: Path):
        self.path, self.file, self.pos = path, open(path, "wb"), 0

    def add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        offset = self.pos + len(header)
        pad = -len(data) % tarfile.BLOCKSIZE
        self.file.write(header)
        self.file.write(data)
        self.file.write(b"\0" * pad)
        self.pos = offset + len(data) + pad
        return offset

    def close(self) -> None:
        end = self.pos + 2 * tarfile.BLOCKSIZE  # end-of-archive marker, padded to a record like tarfile
        self.file.write(b"\0" * (end - self.pos + (-end % tarfile.RECORDSIZE)))
        self.file.close()


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pack_split(split: str, root: Path, samples: list[tuple[str, int]], out: Path, shard_size: int,
               max_side: int, quality: int, workers: int) -> tuple[dict, preflight.Report]:
    """Write one split's shards, index and names into `out`; returns its index.json entry."""
    report = preflight.Report(total=len(samples))
    rows, names, shards, reencoded = [], [], [], 0
    writer, count = None, 0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        loads = ordered(pool, lambda s: load(s[0], max_side, quality), samples, window=8 * workers)
        for i, ((path, label), (problem, data, re)) in enumerate(zip(samples, loads)):
            if problem:
                getattr(report, problem).append(path)
            if data is None:
                continue
            relative = os.path.relpath(path, root / split)
            if "\n" in relative:
                raise DataError(f"{path}: a newline in a file name")
            key = tar_key(relative)
            member = 3 * tarfile.BLOCKSIZE + len(data)  # two headers, the label block, the data
            if writer is None or (writer.pos + member > shard_size and count):
                if writer is not None:
                    writer.close()
                    shards.append({"file": writer.path.name, "samples": count})
                writer, count = ShardWriter(out / f"{split}-{len(shards):06d}.tar"), 0
            offset = writer.add(f"{key}.{extension(path, re)}", data)
            writer.add(f"{key}.cls", str(label).encode())
            rows.append((len(shards), offset, len(data), label))
            names.append(relative)
            count, reencoded = count + 1, reencoded + re
            if (i + 1) % 50000 == 0:
                print(f"  {split}: {i + 1}/{len(samples)} ({(i + 1) / (time.perf_counter() - t0):.0f} files/s)",
                      flush=True)
    if writer is None:
        raise DataError(f"{root / split}: no usable images")
    writer.close()
    shards.append({"file": writer.path.name, "samples": count})
    np.save(out / f"{split}.index.npy", np.array(rows, dtype=np.int64).reshape(-1, 4))
    (out / f"{split}.names.txt").write_text("".join(n + "\n" for n in names))
    for s in shards:
        s["size"] = (out / s["file"]).stat().st_size
    wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": split,
            "shardlist": [{"url": s["file"], "nsamples": s["samples"], "filesize": s["size"]} for s in shards]}
    (out / f"{split}.wids.json").write_text(json.dumps(wids, indent=1))
    entry = {"samples": len(rows), "source_files": len(samples), "left_out": len(report.unusable),
             "preflight": {k: len(getattr(report, k)) for k in preflight.UNUSABLE + preflight.WARNINGS},
             "reencoded": reencoded, "shards": shards, "index": f"{split}.index.npy",
             "names": f"{split}.names.txt", "wids": f"{split}.wids.json"}
    return entry, report


def pack(root: Path, out: Path, shard_size: int = 2**30, max_side: int = 0, quality: int = 90,
         workers: int = 0, val_labels: Path | None = None) -> dict:
    """Pack `root` into `out` unless `out` already holds this very pack; returns its index."""
    root, out = Path(root), Path(out)
    workers = workers or min(32, 4 * (os.cpu_count() or 1))  # I/O-bound on shared filesystems
    classes, samples = source_splits(root, val_labels)
    options = {"shard_size": shard_size, "max_side": max_side, "quality": quality if max_side else None}
    fp = fingerprint(samples, options, workers)
    if (out / INDEX).is_file():
        meta = json.loads((out / INDEX).read_text())
        if meta.get("fingerprint") == fp:
            print(f"{out}: already packed from this input, nothing to do")
            return meta
        raise DataError(f"{out}: holds a pack of other input or options (from {meta.get('source')}); "
                        "remove it or choose another output")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not a packed dataset; choose another output")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    splits, reports = {}, {}
    for split in SPLITS:
        splits[split], report = pack_split(split, root, samples[split], tmp, shard_size, max_side, quality, workers)
        reports[split] = asdict(report)
        print(f"{split}: {splits[split]['samples']} samples in {len(splits[split]['shards'])} shards, "
              f"{splits[split]['left_out']} unusable files left out", flush=True)
    (tmp / "report.json").write_text(json.dumps(reports, indent=1))
    files = {}
    with ThreadPoolExecutor(min(8, workers)) as pool:  # sha256 of what is on disk, for staging's check
        names = sorted(p.name for p in tmp.iterdir())
        for name, digest in zip(names, pool.map(lambda n: sha256(tmp / n), names)):
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": digest}
    meta = {"format": FORMAT, "source": str(root.resolve()), "fingerprint": fp, "classes": classes,
            "encoding": {"max_side": max_side, "quality": options["quality"]}, "shard_size": shard_size,
            "splits": splits, "report": "report.json", "files": files,
            "seconds": round(time.perf_counter() - t0, 1)}
    (tmp / INDEX).write_text(json.dumps(meta, indent=1))
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)  # the pack appears whole or not at all
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="<root>/{train,val}/<class>/<image> (val may be flat, see --val-labels)")
    p.add_argument("out", type=Path, help="the packed dataset's folder (data.root=OUT)")
    p.add_argument("--shard-size", type=parse_size, default=2**30, help="bytes per shard (default 1GiB)")
    p.add_argument("--max-side", type=int, default=0, help="re-encode images whose longer side exceeds this; 0 = off")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    p.add_argument("--workers", type=int, default=0, help="reading/checking threads (default 4 per CPU, <= 32)")
    p.add_argument("--val-labels", type=Path, default=None,
                   help=f"labels of a flat val/ ({VAL_LABELS} or '<file> <wnid>' lines); default: looked for")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        meta = pack(args.root, args.out, args.shard_size, args.max_side, args.quality, args.workers, args.val_labels)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f["size"] for f in meta["files"].values())
    counts = ", ".join(f"{split} {v['samples']}" for split, v in meta["splits"].items())
    print(f"{args.out}: {counts} samples, {size / 2**30:.2f} GiB ({time.perf_counter() - t0:.1f}s); "
          f"data.root={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
