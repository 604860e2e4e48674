"""Turn datasets into the ImageNet folder layout the loaders read: <root>/{train,val}/<wnid>/<n>.JPEG.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (IDX files under
/usr/share/datasets/fashion-mnist/) and is read with torchvision's own FashionMNIST class. The
conversion is written once with a manifest; running it again checks the manifest and returns.
The official ILSVRC2012 validation archive is flat; `imagenet-val` sorts it into class folders.

    python -m data.prepare fashion-mnist datasets/fashion-mnist
    python -m data.prepare imagenet-val /data/imagenet/val LOC_val_solution.csv
    python -m data.prepare check-imagenet /data/imagenet
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import tempfile
from pathlib import Path

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MANIFEST = "manifest.json"
IMAGENET_CLASSES = Path(__file__).with_name("imagenet_classes.txt")  # the 1000 ILSVRC2012 wnids, sorted
WNID = re.compile(r"n\d{8}")


def wnid(label: int) -> str:
    """ImageNet-style class id: folders sort in label order, like n01440764 ... n15075141."""
    return f"n{label:08d}"


def _fashion_mnist_raw(src: Path, tmp: Path) -> Path:
    """Lay the Debian IDX files out where torchvision.datasets.FashionMNIST looks for them."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        gz, plain = src / f"{name}.gz", src / name
        if plain.exists():
            (raw / name).symlink_to(plain)
        elif gz.exists():
            import gzip

            with gzip.open(gz) as fin, open(raw / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            raise FileNotFoundError(
                f"Fashion-MNIST file '{gz}' not found; install it with "
                "`apt-get install dataset-fashion-mnist` or pass --source")
    return tmp


def prepare_fashion_mnist(out: Path, src: Path = DEBIAN_FASHION_MNIST, quality: int = 95) -> Path:
    """Write Fashion-MNIST as 60,000 train and 10,000 val grayscale JPEGs; idempotent."""
    from torchvision.datasets import FashionMNIST

    out = Path(out)
    manifest = out / MANIFEST
    if manifest.exists():
        info = json.loads(manifest.read_text())
        counts = {s: sum(1 for _ in (out / s).glob("*/*.JPEG")) for s in ("train", "val")}
        if counts == info["counts"]:
            return out
    with tempfile.TemporaryDirectory() as tmp:
        root = _fashion_mnist_raw(Path(src), Path(tmp))
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        counts = {}
        for split, train in (("train", True), ("val", False)):
            ds = FashionMNIST(str(root), train=train, download=False)
            for c in range(len(ds.classes)):
                (staging / split / wnid(c)).mkdir(parents=True)
            for i, (img, label) in enumerate(ds):
                img.save(staging / split / wnid(label) / f"{i:05d}.JPEG", quality=quality)
            counts[split] = len(ds)
        classes = FashionMNIST.classes
        (staging / "synsets.txt").write_text("".join(f"{wnid(i)} {c}\n" for i, c in enumerate(classes)))
        (staging / MANIFEST).write_text(json.dumps(
            {"dataset": "fashion-mnist", "source": str(src), "quality": quality, "counts": counts,
             "classes": {wnid(i): c for i, c in enumerate(classes)}}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)  # the folder appears whole or not at all
    return out


def read_val_labels(labels_file: Path) -> dict[str, str]:
    """{file name: wnid} from either "ILSVRC2012_val_00000001.JPEG n01751748" lines or Kaggle's
    LOC_val_solution.csv ("ImageId,PredictionString" with the wnid first in the boxes)."""
    text = Path(labels_file).read_text()
    if text.startswith("ImageId,"):
        rows = ((r["ImageId"], r["PredictionString"].split()[0]) for r in csv.DictReader(text.splitlines()))
    else:
        rows = (line.split()[:2] for line in text.splitlines() if line.strip())
    labels = {}
    for name, wnid_ in rows:
        if not WNID.fullmatch(wnid_):
            raise ValueError(f"{labels_file}: '{wnid_}' (for {name}) is not a wnid like n01751748")
        labels[name if Path(name).suffix else name + ".JPEG"] = wnid_
    return labels


def labelled_val_files(val_dir: Path, labels_file: Path) -> dict[str, str]:
    """`read_val_labels`, after checking that every labelled image is in `val_dir`, flat or
    already in its class folder (also what `data.pack` reads a flat val split with)."""
    val_dir = Path(val_dir)
    labels = read_val_labels(labels_file)
    missing = [n for n, w in labels.items() if not (val_dir / n).exists() and not (val_dir / w / n).exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(labels)} labelled images are not in {val_dir}, "
                                f"e.g. {missing[0]}")
    return labels


def imagenet_val_to_folders(val_dir: Path, labels_file: Path) -> dict[str, int]:
    """Move the flat ILSVRC2012 val images into <val_dir>/<wnid>/; idempotent, so an interrupted
    run can simply be repeated. Returns how many were moved and how many were already in place."""
    val_dir = Path(val_dir)
    labels = labelled_val_files(val_dir, labels_file)  # checks everything before moving anything
    counts = {"moved": 0, "already": 0}
    for name, wnid_ in labels.items():
        dst = val_dir / wnid_ / name
        if dst.exists():
            counts["already"] += 1
            continue
        dst.parent.mkdir(exist_ok=True)
        (val_dir / name).rename(dst)
        counts["moved"] += 1
    return counts


def imagenet_wnids() -> list[str]:
    return IMAGENET_CLASSES.read_text().split()


def check_imagenet_classes(root: Path) -> list[str]:
    """Problems (one line each) with the class folders of <root>/train and <root>/val against the
    1000 ILSVRC2012 wnids; [] means both splits hold exactly those classes."""
    root, expected = Path(root), set(imagenet_wnids())
    problems = []
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            problems.append(f"{folder}: missing")
            continue
        found = {p.name for p in folder.iterdir() if p.is_dir()}
        for what, names in (("missing", expected - found), ("unexpected", found - expected)):
            if names:
                problems.append(f"{folder}: {len(names)} {what} class folders, e.g. {sorted(names)[:3]}")
        if not any(folder.glob("*/*")) and found:
            problems.append(f"{folder}: class folders are empty")
    return problems


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    fm = sub.add_parser("fashion-mnist", help="Debian's Fashion-MNIST → JPEG folders")
    fm.add_argument("out", type=Path)
    fm.add_argument("--source", type=Path, default=DEBIAN_FASHION_MNIST)
    iv = sub.add_parser("imagenet-val", help="flat ILSVRC2012 val folder → <wnid>/ subfolders")
    iv.add_argument("val_dir", type=Path)
    iv.add_argument("labels", type=Path, help='"<file> <wnid>" lines or LOC_val_solution.csv')
    ck = sub.add_parser("check-imagenet", help="compare class folders with the 1000 ILSVRC2012 wnids")
    ck.add_argument("root", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "imagenet-val":
        try:
            print(f"{args.val_dir}: {imagenet_val_to_folders(args.val_dir, args.labels)}")
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
    if args.cmd == "check-imagenet":
        problems = check_imagenet_classes(args.root)
        print("\n".join(problems) or f"{args.root}: train and val hold the 1000 ImageNet classes")
        if problems:
            raise SystemExit(1)
    if args.cmd == "fashion-mnist":
        try:
            out = prepare_fashion_mnist(args.out, args.source)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"prepared {out}: {json.loads((out / MANIFEST).read_text())['counts']}")


if __name__ == "__main__":
    main()
