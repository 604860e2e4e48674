"""Preflight finds every kind of problem file; ImageNet val sorting and class checks."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import preflight
from data.prepare import check_imagenet_classes, imagenet_val_to_folders, imagenet_wnids

ROOT = Path(__file__).resolve().parent.parent
TRAIN_COUNTS = (7, 5, 4)  # good JPEGs per class, deliberately uneven
VAL_COUNTS = (4, 3, 3)
N_SPECIAL_TRAIN = 6  # CMYK, PNG-as-JPEG, grayscale, zero-byte, truncated, non-image
N_SPECIAL_VAL = 3  # CMYK, PNG-as-JPEG, grayscale


def jpeg_bytes(pixels: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def smooth(seed: int, size: int = 32) -> np.ndarray:
    """A smooth gradient: decoders agree on it to within rounding, unlike on noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    a, b, c = rng.uniform(40, 215, 3)
    return np.stack([a + 40 * x, b + 40 * y, c - 40 * x * y], -1).clip(0, 255).astype(np.uint8)


def messy_folder(root: Path) -> dict:
    """<root>/{train,val}/n0000000k/: good JPEGs plus, in train, a CMYK JPEG and a PNG named .JPEG
    (class 0), a zero-byte and a truncated JPEG (class 1), a text file named .JPEG and a grayscale
    JPEG (class 2); val also holds a CMYK JPEG, a PNG named .JPEG (class 0) and a grayscale JPEG
    (class 1). Returns the special paths by kind."""
    special = {"cmyk": [], "png_as_jpeg": [], "grayscale": [], "zero_byte": [], "truncated": [], "non_image": []}
    for split, counts in (("train", TRAIN_COUNTS), ("val", VAL_COUNTS)):
        for c, count in enumerate(counts):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{split}_{c}_{i:02d}.JPEG").write_bytes(jpeg_bytes(smooth(100 * c + i)))
        extra = {"cmyk": (0, jpeg_bytes(smooth(7), "CMYK")), "png_as_jpeg": (0, jpeg_bytes(smooth(8), fmt="PNG")),
                 "grayscale": (2 if split == "train" else 1, jpeg_bytes(smooth(10), "L"))}
        if split == "train":
            extra |= {"zero_byte": (1, b""), "truncated": (1, jpeg_bytes(smooth(9))[:300]),
                      "non_image": (2, b"this is not an image\n" * 20)}
        for kind, (c, data) in extra.items():
            path = root / split / f"n{c:08d}" / f"{split}_{kind}.JPEG"
            path.write_bytes(data)
            special[kind].append(str(path))
    (root / "synsets.txt").write_text("not an image, ignored\n")
    return special


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    return root, messy_folder(root)


def test_scan_counts_each_kind(messy):
    root, special = messy
    report = preflight.scan(root, workers=2)
    assert report.total == sum(TRAIN_COUNTS) + sum(VAL_COUNTS) + N_SPECIAL_TRAIN + N_SPECIAL_VAL
    for kind, paths in special.items():
        assert sorted(getattr(report, kind)) == sorted(paths), kind
    assert report.unusable == set(special["zero_byte"] + special["truncated"] + special["non_image"])


def test_cli_exit_codes(messy, tmp_path, capsys):
    root, _ = messy
    bad = subprocess.run([sys.executable, "-m", "data.preflight", str(root)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)  # once as a user runs it; the rest in-process (no torch import)
    assert bad.returncode == 1, bad.stderr
    for line in ("zero_byte: 1 (error)", "truncated: 1 (error)", "non_image: 1 (error)", "cmyk: 2 (warning)",
                 "png_as_jpeg: 2 (warning)", "grayscale: 2 (warning)"):
        assert line in bad.stdout
    assert preflight.main([str(root / "val")]) == 0  # CMYK, PNG-as-JPEG and grayscale only warn
    capsys.readouterr()
    assert preflight.main([str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err


def test_cached_check_reuses_and_invalidates(messy, tmp_path, monkeypatch):
    root, special = messy
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    paths = preflight.list_images(root / "train")
    first = preflight.cached_check(paths)
    monkeypatch.setattr(preflight, "check_files", lambda *a, **k: pytest.fail("cache not used"))
    assert preflight.cached_check(paths) == first
    copy = tmp_path / "copy.JPEG"
    copy.write_bytes(b"")
    with pytest.raises(pytest.fail.Exception):  # a different file list is decoded again
        preflight.cached_check(paths + [str(copy)])


@pytest.mark.parametrize("fmt", ["lines", "csv"])
def test_imagenet_val_to_folders(tmp_path, fmt):
    val = tmp_path / "val"
    val.mkdir()
    wnids = ["n01751748", "n09193705", "n01751748", "n02105855"]
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 5)]
    for n in names:
        (val / n).write_bytes(jpeg_bytes(smooth(0)))
    labels = tmp_path / "labels"
    if fmt == "lines":
        labels.write_text("".join(f"{n} {w}\n" for n, w in zip(names, wnids)))
    else:  # Kaggle's LOC_val_solution.csv: no extension, boxes after the wnid
        labels.write_text("ImageId,PredictionString\n" + "".join(
            f"{n[:-5]},{w} 1 2 30 40 {w} 5 6 7 8\n" for n, w in zip(names, wnids)))
    assert imagenet_val_to_folders(val, labels) == {"moved": 4, "already": 0}
    assert sorted(str(p.relative_to(val)) for p in val.rglob("*.JPEG")) == sorted(
        f"{w}/{n}" for n, w in zip(names, wnids))
    assert imagenet_val_to_folders(val, labels) == {"moved": 0, "already": 4}  # idempotent
    (val / wnids[0] / names[0]).unlink()
    with pytest.raises(FileNotFoundError, match="1 of 4"):
        imagenet_val_to_folders(val, labels)


def test_check_imagenet_classes(tmp_path):
    wnids = imagenet_wnids()
    assert len(set(wnids)) == 1000 and wnids == sorted(wnids) and wnids[0] == "n01440764"
    for split in ("train", "val"):
        for w in wnids:
            (tmp_path / split / w).mkdir(parents=True)
            (tmp_path / split / w / "a.JPEG").touch()
    assert check_imagenet_classes(tmp_path) == []
    (tmp_path / "val" / wnids[5] / "a.JPEG").unlink()
    (tmp_path / "val" / wnids[5]).rmdir()
    (tmp_path / "val" / "n99999999").mkdir()
    problems = check_imagenet_classes(tmp_path)
    assert len(problems) == 2 and wnids[5] in problems[0] and "n99999999" in problems[1]


def test_report_round_trips_through_json(messy):
    report = preflight.scan(messy[0] / "val")
    assert preflight.Report(**json.loads(json.dumps(preflight.asdict(report)))) == report
