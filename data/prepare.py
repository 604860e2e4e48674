"""Turn datasets into the ImageNet folder layout the loaders read: <root>/{train,val}/<wnid>/<n>.JPEG.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (IDX files under
/usr/share/datasets/fashion-mnist/) and is read with torchvision's own FashionMNIST class. The
conversion is written once with a manifest; running it again checks the manifest and returns.

    python -m data.prepare fashion-mnist datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MANIFEST = "manifest.json"


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    fm = sub.add_parser("fashion-mnist", help="Debian's Fashion-MNIST → JPEG folders")
    fm.add_argument("out", type=Path)
    fm.add_argument("--source", type=Path, default=DEBIAN_FASHION_MNIST)
    args = p.parse_args(argv)
    if args.cmd == "fashion-mnist":
        try:
            out = prepare_fashion_mnist(args.out, args.source)
        except FileNotFoundError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"prepared {out}: {json.loads((out / MANIFEST).read_text())['counts']}")


if __name__ == "__main__":
    main()
