"""The augmentations chosen in config (`data.auto_augment`, `data.random_erasing`), built once for
each loader so that both mean the same thing: torchvision.transforms.v2 on the torch path,
`nvidia.dali.auto_aug` and `fn.erase` inside the DALI graph (on the GPU when DALI runs there).

Order, as in torchvision's reference recipes: crop (`data.crop`) → horizontal flip → TrivialAugment
Wide or RandAugment on the uint8 image → normalise → random erasing on the normalised image with
value 0 (the channel means in pixel terms). DALI flips inside its final crop_mirror_normalize, after
the auto-augmentation; that order gives the same distribution, because every geometric op of both
suites (shear, translate, rotate) draws its sign at random and the colour ops commute with a flip.

Same meaning, not the same pixels: the torch path draws from each sample's seed (data/sampler.py),
DALI from its pipeline RNG. What differs between the suites, by their sources (torchvision 0.29 v2
`_auto_augment.py`, DALI 2.4 `auto_aug/{trivial,rand}_augment.py`):
- TrivialAugmentWide: the same 14 ops and ranges (shear 0.99, translate 32 px, rotate 135 deg,
  posterize 8..2 bits) except that DALI starts brightness/contrast/colour/sharpness at 0.01
  instead of 0 and solarize at threshold 256 instead of 255 (the lowest bin: identity in both).
- RandAugment: translate is given to DALI as torchvision's 150/331 of the image size (DALI's
  default is 100/224); the colour ops' lower bound and solarize's differ as above.
- fill for shear/rotate/translate: 0 on both (DALI's default would be 128); bilinear on both.

Random erasing (Zhong et al. 2017) has torchvision's v2.RandomErasing distribution on both paths:
with probability p, up to 10 tries of area fraction U(0.02, 0.33) and log aspect ratio
U(log 0.3, log 3.3), h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio)), the first box
that fits (h < H and w < W), corner uniform over the positions where it fits; none if no try fits.
- torch: the worker, inside the sample's seeded block, runs torchvision's own RandomErasing draws
  (`ErasingBox`: its forward and make_params, unchanged) and returns the box instead of erasing;
  `erase_` zeroes the boxes on the device after normalisation. One uint8 image plus 4 integers
  cross to the device, and the erased pixels are exactly torchvision's 0 on the normalised image.
- DALI: `dali_random_erasing` unrolls the same 10 tries as per-sample arithmetic on DALI's RNG
  and `fn.erase(fill_value=0)` applies the box to the normalised output.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode, v2

ERASE_SCALE, ERASE_RATIO, ERASE_TRIES = (0.02, 0.33), (0.3, 3.3), 10  # v2.RandomErasing's defaults
RAND_AUGMENT_TRANSLATE = 150 / 331  # torchvision's RandAugment: translate up to 150/331 of the image size


def torch_auto_augment(cfg) -> list[v2.Transform]:
    """`data.auto_augment` as a v2 transform on uint8 CHW images ([] for none)."""
    if cfg.auto_augment == "trivial_augment":
        return [v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)]
    if cfg.auto_augment == "rand_augment":
        return [v2.RandAugment(num_ops=cfg.rand_augment_n, magnitude=cfg.rand_augment_m,
                               interpolation=InterpolationMode.BILINEAR)]
    return []


class ErasingBox(v2.RandomErasing):
    """v2.RandomErasing(p) whose draws are torchvision's own (the same calls on torch's default
    generator) but which returns the box it would erase instead of erasing it."""

    def box(self, image: torch.Tensor) -> torch.Tensor:
        """int32 (i, j, h, w) of the region to erase in `image` (C, H, W); h = w = 0: none."""
        self._params = None
        self(image)  # RandomErasing.forward: the coin, then make_params; transform() below records
        p = self._params
        if p is None or p["v"] is None:
            return torch.zeros(4, dtype=torch.int32)
        return torch.tensor([p["i"], p["j"], p["h"], p["w"]], dtype=torch.int32)

    def transform(self, inpt, params):
        self._params = params
        return inpt


def erase_(images: torch.Tensor, boxes: torch.Tensor, masked: bool | None = None) -> torch.Tensor:
    """Sets box n = (i, j, h, w) of images (N, C, H, W) to 0 in place, as torchvision's F.erase(v=0);
    `boxes` int (N, 4) on the host. `masked` (default: off the CPU) is one masked fill over the batch
    (one kernel, no host sync); otherwise a slice per erased image, which touches only the boxes
    (on this CPU, 256 images of 224 px with p = 0.25: 1.7 ms against 89 ms for the masked fill)."""
    if not (images.device.type != "cpu" if masked is None else masked):
        for n, (i, j, h, w) in enumerate(boxes.tolist()):
            if h:
                images[n, :, i:i + h, j:j + w] = 0.0
        return images
    i, j, h, w = boxes.to(images.device, non_blocking=True).unbind(1)
    ys = torch.arange(images.shape[-2], device=images.device)
    xs = torch.arange(images.shape[-1], device=images.device)
    rows = (ys >= i[:, None]) & (ys < (i + h)[:, None])
    cols = (xs >= j[:, None]) & (xs < (j + w)[:, None])
    return images.masked_fill_(rows[:, None, :, None] & cols[:, None, None, :], 0.0)


def dali_auto_augment(images, size, cfg):
    """`data.auto_augment` on DALI uint8 HWC images; `size` the per-sample (H, W) float node.
    Needs a pipeline built with enable_conditionals=True."""
    from nvidia.dali.auto_aug import rand_augment, trivial_augment

    if cfg.auto_augment == "trivial_augment":
        return trivial_augment.trivial_augment_wide(images, fill_value=0)  # translate 32 px: torchvision's
    if cfg.auto_augment == "rand_augment":
        return rand_augment.rand_augment(images, n=cfg.rand_augment_n, m=cfg.rand_augment_m, shape=size,
                                         max_translate_rel=RAND_AUGMENT_TRANSLATE, fill_value=0)
    return images


def dali_random_erasing(images, size, p: float):
    """v2.RandomErasing(p)'s distribution (module docstring) on DALI images with H and W axes,
    `size` the per-sample (H, W) float node of the output."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    def cast(x):
        return fn.cast(x, dtype=types.FLOAT)

    height, width = size[0], size[1]
    area = height * width
    h = w = found = 0.0
    for _ in range(ERASE_TRIES):  # later tries first: the first try that fits is what remains
        frac = fn.random.uniform(range=list(ERASE_SCALE))
        ratio = dmath.exp(fn.random.uniform(range=[math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])]))
        ht = dmath.floor(dmath.sqrt(area * frac * ratio) + 0.5)
        wt = dmath.floor(dmath.sqrt(area * frac / ratio) + 0.5)
        fits = cast((ht < height) & (wt < width))
        h, w, found = fits * ht + (1 - fits) * h, fits * wt + (1 - fits) * w, dmath.max(fits, found)
    on = found * cast(fn.random.coin_flip(probability=p))

    def corner(extent, length):  # uniform integer in [0, extent - length]
        u = fn.random.uniform(range=[0.0, 1.0])
        return dmath.min(dmath.floor(u * (extent - length + 1)), extent - length)

    anchor = cast(fn.stack(corner(height, h), corner(width, w)))
    shape = cast(fn.stack(on * h, on * w))
    return fn.erase(images, anchor=anchor, shape=shape, axis_names="HW", fill_value=0.0)
