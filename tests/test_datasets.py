"""Offline Colored MNIST, and the folder loaders on tiny fixtures built here."""
import os

import numpy as np
import pytest
import torch

from dataset_fixtures import png as _png
from dataset_fixtures import write_csv as _csv
from gerne_kernels.datasets import (COLORS, celeba, civilcomments, colored_mnist,
                                    colored_mnist_folder, corrupted_cifar10_folder,
                                    load_digit_images, waterbirds)
from gerne_kernels.sampler import group_counts


# ---------------------------------------------------------------------------------------------
# Offline Colored MNIST

@pytest.mark.parametrize("minority", [0.005, 0.01, 0.02, 0.05])
def test_train_split_has_the_minority_ratio(minority):
    d = colored_mnist("train", minority, size=7)
    counts = group_counts(d.y, d.a).numpy()
    n = counts.sum(axis=1)
    assert np.all(n == n[0]) and n[0] >= 9 / minority
    conflicting = n - np.diag(counts)
    assert np.all(conflicting == np.round(minority * n))
    assert counts.min() >= 1  # every group present: GERNE's sampler can draw it
    off = counts[~np.eye(10, dtype=bool)].reshape(10, 9)
    assert np.all(off.max(axis=1) - off.min(axis=1) <= 1)  # spread evenly


def test_no_digit_in_both_its_class_color_and_another():
    d = colored_mnist("train", 0.05, size=7)
    gray = d.x.amax(dim=1) / COLORS[d.a].amax(dim=1)[:, None, None]
    for k in range(10):
        conflicting = gray[(d.y == k) & (d.a != k)].flatten(1)
        aligned = torch.unique(gray[(d.y == k) & (d.a == k)].flatten(1), dim=0)
        assert len(conflicting) == 50
        dist = torch.cdist(conflicting.double(), aligned.double(), p=1)
        assert dist.min() > 1e-3
    # within the conflicting samples images repeat only when the reserve is exhausted
    assert torch.unique(conflicting, dim=0).shape[0] == 50


def test_random_assignment_is_binomial():
    d = colored_mnist("train", 0.05, size=7, assignment="random", n_per_class=2000)
    share = float((d.a != d.y).float().mean())
    sd = np.sqrt(0.05 * 0.95 / 20000)
    assert abs(share - 0.05) < 5 * sd


def test_test_split_is_unbiased_and_complete():
    d = colored_mnist("test", 0.01, size=7)
    counts = group_counts(d.y, d.a).numpy()
    assert np.all(counts == counts[0, 0]) and counts[0, 0] == 100


def test_unbiased_validation_split_is_drawn_like_the_test_split():
    val = colored_mnist("val", 0.01, size=7, unbiased=True)
    counts = group_counts(val.y, val.a).numpy()
    assert np.all(counts == 50)  # 50 validation digits per class, each in all ten colors
    biased = colored_mnist("val", 0.01, size=7)
    assert (biased.a == biased.y).float().mean() > 0.95
    with pytest.raises(ValueError, match="unbiased=True is for the 'val' and 'test'"):
        colored_mnist("train", 0.01, unbiased=True)


def test_pixels_are_the_digit_times_the_color():
    d = colored_mnist("train", 0.05, size=None, n_per_class=60)
    assert d.x.shape == (600, 3, 28, 28) and d.x.dtype == torch.float32
    imgs, labels = load_digit_images("mnist")
    for i in (0, 123, 599):
        x, a = d.x[i], int(d.a[i])
        channel = int(torch.argmax(COLORS[a]))
        gray = x[channel] / COLORS[a][channel]
        np.testing.assert_allclose((gray[None] * COLORS[a][:, None, None]).numpy(), x.numpy(),
                                   atol=1e-6)
        # the grayscale is one of the real digits of that class
        same = imgs[labels == int(d.y[i])]
        assert torch.min((same - gray).abs().amax(dim=(1, 2))) < 1e-5


def test_splits_use_disjoint_digits():
    from gerne_kernels.datasets.colored_mnist import _split_images

    imgs, labels = load_digit_images("mnist")
    parts = {s: torch.cat(_split_images("mnist", s)[1]) for s in ("train", "val", "test")}
    sets = {s: set(v.tolist()) for s, v in parts.items()}
    assert sum(len(v) for v in sets.values()) == len(set.union(*sets.values())) == 5000
    assert [len(v) for v in sets.values()] == [3500, 500, 1000]
    # pixels of test samples come from test digits, never from train digits
    d = colored_mnist("test", 0.01, size=None)
    gray = d.x[::997].amax(dim=1)
    for split, expect in (("test", True), ("train", False)):
        ref = imgs[parts[split]]
        for g in gray:
            scaled = ref * g.max() / ref.amax(dim=(1, 2), keepdim=True)
            found = bool(((scaled - g).abs().amax(dim=(1, 2)) < 1e-5).any())
            assert found == expect


def test_seed_and_options():
    a = colored_mnist("train", 0.02, size=7, seed=3)
    b = colored_mnist("train", 0.02, size=7, seed=3)
    c = colored_mnist("train", 0.02, size=7, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.a, b.a)
    assert not torch.equal(a.a, c.a)
    flat = colored_mnist("val", 0.02, size=7, flatten=True)
    assert flat.x.shape[1] == 3 * 7 * 7
    small = colored_mnist("train", 0.05, source="digits", size=8)
    assert small.x.shape[1:] == (3, 8, 8) and small.x.max() <= 1.0


def test_colored_mnist_errors():
    with pytest.raises(ValueError, match="split"):
        colored_mnist("training")
    with pytest.raises(ValueError, match="minority"):
        colored_mnist("train", 1.5)
    with pytest.raises(ValueError, match="source"):
        colored_mnist("train", source="emnist")
    with pytest.raises(ValueError, match="assignment"):
        colored_mnist("train", assignment="x")


# ---------------------------------------------------------------------------------------------
# Folder loaders on tiny fixtures

def test_waterbirds(tmp_path):
    rows = []
    for i, (y, split, place) in enumerate([(0, 0, 0), (1, 0, 0), (1, 0, 1), (0, 1, 1), (1, 2, 0)]):
        name = f"{i:03d}.Bird/img_{i}.jpg"
        _png(str(tmp_path / name), (10 * i, 0, 0))
        rows.append([i + 1, name, y, split, place])
    _csv(tmp_path / "metadata.csv", ["img_id", "img_filename", "y", "split", "place"], rows)
    train = waterbirds(str(tmp_path), "train")
    assert len(train) == 3
    assert train.labels.tolist() == [0, 1, 1] and train.attributes.tolist() == [0, 0, 1]
    x, y, a = train[2]
    assert x.shape == (3, 5, 6) and (y, a) == (1, 1)
    assert x[0, 0, 0].item() == pytest.approx(20 / 255)
    assert len(waterbirds(str(tmp_path), "test")) == 1
    seen = waterbirds(str(tmp_path), "val", transform=lambda img: img.size)
    assert seen[0] == ((6, 5), 0, 1)


def test_celeba_group_dro_layout(tmp_path):
    data = tmp_path / "data"
    os.makedirs(data / "img_align_celeba")
    attrs, parts = [], []
    for i, (blond, male, part) in enumerate([(1, -1, 0), (-1, 1, 0), (1, 1, 0), (-1, -1, 1)]):
        name = f"{i:06d}.jpg"
        _png(str(data / "img_align_celeba" / name), (0, 0, 50))
        attrs.append([name, -1, blond, male])
        parts.append([name, part])
    _csv(data / "list_attr_celeba.csv", ["image_id", "Bald", "Blond_Hair", "Male"], attrs)
    _csv(data / "list_eval_partition.csv", ["image_id", "partition"], parts)
    for root in (tmp_path, data):  # the release folder or its data/ subfolder
        train = celeba(str(root), "train")
        assert train.labels.tolist() == [1, 0, 1] and train.attributes.tolist() == [0, 1, 1]
        assert train[0][0].shape == (3, 5, 6)
    assert len(celeba(str(tmp_path), "val")) == 1
    other = celeba(str(tmp_path), "train", target="Bald", attribute="Blond_Hair")
    assert other.labels.tolist() == [0, 0, 0] and other.attributes.tolist() == [1, 0, 1]


def test_civilcomments(tmp_path):
    ids = ["male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white"]
    rows = [
        ["you are nice", "train", 0.1] + [0.0] * 8,
        ["awful muslim comment", "train", 0.8] + [0, 0, 0, 0, 0.9, 0, 0, 0],
        ["meh", "train", 0.5] + [""] * 8,              # empty scores count as 0
        ["white people", "test", 0.2] + [0, 0, 0, 0, 0, 0, 0, 0.6],
    ]
    folder = tmp_path / "civilcomments_v1.0"
    os.makedirs(folder)
    _csv(folder / "all_data_with_identities.csv", ["comment_text", "split", "toxicity"] + ids,
         rows)
    train = civilcomments(str(tmp_path), "train")
    assert train.labels.tolist() == [0, 1, 1] and train.attributes.tolist() == [0, 1, 0]
    assert train[1] == ("awful muslim comment", 1, 1)
    assert civilcomments(str(folder), "test", transform=len)[0] == (12, 0, 1)
    assert civilcomments(str(folder), "test", identity="black").attributes.tolist() == [0]


@pytest.mark.parametrize("loader", [colored_mnist_folder, corrupted_cifar10_folder])
def test_lff_dfa_layout(tmp_path, loader):
    root = tmp_path / "1pct"
    _png(str(root / "align" / "3" / "0_3_3.png"), (255, 0, 0))
    _png(str(root / "align" / "4" / "1_4_4.png"), (0, 255, 0))
    _png(str(root / "conflict" / "3" / "2_3_7.png"), (0, 0, 255))
    _png(str(root / "valid" / "5_1_2.png"), (9, 9, 9))
    _png(str(tmp_path / "test" / "2" / "9_2_5.png"), (1, 2, 3))  # DFA keeps test beside
    train = loader(str(root), "train")
    pairs = sorted(zip(train.labels.tolist(), train.attributes.tolist()))
    assert pairs == [(3, 3), (3, 7), (4, 4)]
    x, y, a = train[train.attributes.tolist().index(7)]
    assert (y, a) == (3, 7) and x[2, 0, 0].item() == 1.0 and x[0, 0, 0].item() == 0.0
    assert loader(str(root), "val").labels.tolist() == [1]
    test = loader(str(root), "test")
    assert test.labels.tolist() == [2] and test.attributes.tolist() == [5]


def test_lff_bad_file_name(tmp_path):
    _png(str(tmp_path / "align" / "0" / "image.png"), (0, 0, 0))
    os.makedirs(tmp_path / "conflict")
    with pytest.raises(ValueError, match="_<y>_<a>"):
        colored_mnist_folder(str(tmp_path))


@pytest.mark.parametrize("loader, expected", [
    (waterbirds, "metadata.csv"),
    (celeba, "list_attr_celeba.csv"),
    (civilcomments, "all_data_with_identities.csv"),
    (colored_mnist_folder, "align/<class>/<idx>_<y>_<a>.png"),
    (corrupted_cifar10_folder, "conflict/<class>"),
])
def test_missing_folder_explains_layout(tmp_path, loader, expected):
    with pytest.raises(FileNotFoundError, match="Expected layout") as info:
        loader(str(tmp_path / "nowhere"), "train")
    assert expected in str(info.value)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        loader(str(tmp_path / "empty"), "train")


def test_bad_split_name(tmp_path):
    with pytest.raises(ValueError, match="split"):
        waterbirds(str(tmp_path), "valid")
