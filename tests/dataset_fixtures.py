"""Tiny copies of the benchmarks' folder layouts, built in a test's tmp_path."""
import csv
import os

from PIL import Image

# (y, a) groups of a two-class, two-attribute benchmark; train is biased, val/test balanced
GROUPS = ((0, 0), (0, 1), (1, 0), (1, 1))
TRAIN_SIZES = {(0, 0): 6, (0, 1): 2, (1, 0): 2, (1, 1): 6}


def png(path, color, size=(6, 5)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _color(i, y, a):
    """The attribute sets the red channel, the class the green one, i a little noise."""
    return (40 + 150 * a + i % 7, 30 + 180 * y, (13 * i) % 255)


def split_groups(per_group_eval=2):
    """(split code, y, a) for every sample: biased train, balanced val and test."""
    out = []
    for split, sizes in ((0, TRAIN_SIZES), (1, dict.fromkeys(GROUPS, per_group_eval)),
                         (2, dict.fromkeys(GROUPS, per_group_eval))):
        for (y, a), n in sizes.items():
            out += [(split, y, a)] * n
    return out


def waterbirds_folder(root, size=(8, 8)):
    """group-DRO layout: metadata.csv (img_id, img_filename, y, split, place) + images."""
    rows = []
    for i, (split, y, a) in enumerate(split_groups()):
        name = f"{i:03d}.Bird/img_{i}.jpg"
        png(os.path.join(root, name), _color(i, y, a), size)
        rows.append([i + 1, name, y, split, a])
    write_csv(os.path.join(root, "metadata.csv"),
              ["img_id", "img_filename", "y", "split", "place"], rows)
    return root


def celeba_folder(root, size=(8, 8), with_partition=True):
    """group-DRO's celebA/data layout: attributes and partition CSVs + img_align_celeba/."""
    data = os.path.join(root, "data")
    attrs, parts = [], []
    for i, (split, y, a) in enumerate(split_groups()):
        name = f"{i:06d}.jpg"
        png(os.path.join(data, "img_align_celeba", name), _color(i, y, a), size)
        attrs.append([name, -1, 2 * y - 1, 2 * a - 1])
        parts.append([name, split])
    write_csv(os.path.join(data, "list_attr_celeba.csv"), ["image_id", "Bald", "Blond_Hair", "Male"],
              attrs)
    if with_partition:
        write_csv(os.path.join(data, "list_eval_partition.csv"), ["image_id", "partition"], parts)
    return root


def lff_folder(root, size=(8, 8)):
    """LfF/DFA layout: align/, conflict/, valid/ and test/ with <idx>_<y>_<a>.png names."""
    for i, (split, y, a) in enumerate(split_groups()):
        folder = {0: "align" if y == a else "conflict", 1: "valid", 2: "test"}[split]
        png(os.path.join(root, folder, str(y), f"{i}_{y}_{a}.png"), _color(i, y, a), size)
    return root


IDENTITIES = ["male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black",
              "white"]
WORDS = ["you", "are", "nice", "awful", "people", "muslim", "white", "comment", "good", "bad"]


def civilcomments_folder(root):
    """WILDS layout: all_data_with_identities.csv (comment_text, split, toxicity, identities)."""
    rows = []
    for i, (split, y, a) in enumerate(split_groups()):
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 4))
        identity = [0.0] * len(IDENTITIES)
        if a:
            identity[4] = 0.9
        rows.append([text, ("train", "val", "test")[split], 0.8 if y else 0.1] + identity)
    os.makedirs(root, exist_ok=True)
    write_csv(os.path.join(root, "all_data_with_identities.csv"),
              ["comment_text", "split", "toxicity"] + IDENTITIES, rows)
    return root
