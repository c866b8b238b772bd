"""``python -m gerne_kernels train`` on the CPU, on tiny folder fixtures: a few steps of tiny
models, the paper's settings, checkpoint selection, resume, unknown attributes, pretrained
weights and BERT from local files, and bad input."""
import json
import os

import numpy as np
import pytest
import torch

import dataset_fixtures as fx
from gerne_kernels import models, train_cli
from gerne_kernels.__main__ import main as cli

TINY = ["--model", "mlp", "--image-size", "8", "--batch-size", "2", "--steps-per-epoch", "3",
        "--no-progress"]


def run(*argv):
    assert cli(["train", *argv]) == 0


def result_of(out):
    return json.loads((out / "result.json").read_text())


def test_waterbirds_trains_selects_by_val_wga_and_reports_every_group(tmp_path):
    root = fx.waterbirds_folder(str(tmp_path / "wb"))
    out = tmp_path / "out"
    run("--dataset", "waterbirds", "--root", root, "--out", str(out), "--epochs", "3", *TINY)
    r = result_of(out)
    cfg = r["config"]
    # the paper's Waterbirds settings (App. F) where the test did not override them
    assert (cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["c"]) == ("sgd", 1e-4, 0.01, 0.5)
    assert cfg["select"] == "wga" and r["beta"] == pytest.approx(1.0)  # c (beta + 1) = 1
    history = r["val_history"]
    assert [h["step"] for h in history] == [3, 6, 9]
    best = int(np.argmax([h["wga"] for h in history]))  # the earliest of equals
    assert r["best_epoch"] == best + 1 and r["best_step"] == 3 * (best + 1)
    test = r["test"]
    accs = [g["accuracy"] for g in test["per_group"].values()]
    assert sorted(test["per_group"]) == ["0,0", "0,1", "1,0", "1,1"]
    assert all(g["count"] == 2 for g in test["per_group"].values())
    assert test["wga"] == min(accs) and test["gba"] == pytest.approx(np.mean(accs))
    assert os.path.exists(out / "checkpoint.pt")


@pytest.mark.parametrize("attributes", [
    [], ["--attributes", "unknown", "--t", "0.25", "--biased-epochs", "1", "--beta-frac", "0.5"]])
def test_resumed_run_gives_the_uninterrupted_result(tmp_path, attributes):
    """Stopped after epochs 1 and 2, resumed each time (with unknown attributes from a
    checkpoint that holds the pseudo-groups)."""
    root = fx.waterbirds_folder(str(tmp_path / "wb"))
    args = ["--dataset", "waterbirds", "--root", root, "--epochs", "3", "--select", "gba",
            *attributes, *TINY]
    run(*args, "--out", str(tmp_path / "whole"))
    pieces = tmp_path / "pieces"
    run(*args, "--out", str(pieces), "--stop-after", "1")
    assert not (pieces / "result.json").exists()
    run(*args, "--out", str(pieces), "--stop-after", "1")  # epoch 2, from the checkpoint
    run(*args, "--out", str(pieces))
    whole, resumed = result_of(tmp_path / "whole"), result_of(pieces)
    assert resumed["val_history"] == whole["val_history"]
    assert resumed["test"] == whole["test"] and resumed["best_step"] == whole["best_step"]


def test_unknown_attributes_train_gerne_on_pseudo_groups(tmp_path):
    root = fx.lff_folder(str(tmp_path / "cmnist" / "1pct"))
    out = tmp_path / "out"
    run("--dataset", "cmnist", "--root", root, "--out", str(out), "--attributes", "unknown",
        "--t", "0.25", "--epochs", "2", "--biased-epochs", "1", "--beta-frac", "0.5", *TINY)
    r = result_of(out)
    assert r["config"]["lr"] == 0.01  # the paper's learning rate with unknown attributes
    assert "A=2" in r["beta_bounds_source"]
    assert r["beta"] == pytest.approx(0.5 * (r["beta_bounds"][1] + 1) - 1)
    assert r["biased_model"]["best_step"] in (1, 2, 3)  # one biased epoch of 3 steps
    assert r["config"]["select"] == "gba"


def test_pretrained_resnet_from_a_local_file_and_from_torchvisions_cache(tmp_path, monkeypatch):
    torch.manual_seed(1)
    reference = models.resnet("resnet18", 10, pretrained=False)
    weights = tmp_path / "resnet18.pth"
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")},
               weights)
    # strict=False in the loader: a file missing the fc keys is fine, the head is new anyway
    loaded = models.resnet("resnet18", 2, weights=str(weights))
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)
    assert loaded.fc.out_features == 2
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = models._torchvision_cache_files("resnet18")[0]
    assert cached.startswith(str(tmp_path / "torch_home" / "hub" / "checkpoints"))
    os.makedirs(os.path.dirname(cached))
    torch.save(reference.state_dict(), cached)
    assert models.pretrained_resnet_path("resnet18") == cached
    root = fx.waterbirds_folder(str(tmp_path / "wb"), size=(16, 16))
    run("--dataset", "waterbirds", "--root", root, "--out", str(tmp_path / "out"),
        "--model", "resnet18", "--image-size", "16", "--batch-size", "2", "--epochs", "1",
        "--steps-per-epoch", "2", "--no-progress")
    assert result_of(tmp_path / "out")["config"]["pretrained"] is True


def test_missing_pretrained_weights_name_where_they_were_looked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    root = fx.waterbirds_folder(str(tmp_path / "wb"))
    with pytest.raises(SystemExit) as info:
        cli(["train", "--dataset", "waterbirds", "--root", root, "--out", str(tmp_path / "o"),
             "--no-progress"])
    message = str(info.value)
    assert str(tmp_path / "empty_home" / "hub" / "checkpoints") in message
    assert "resnet50-" in message and "--from-scratch" in message and "--weights" in message
    with pytest.raises(SystemExit, match="looked in: .*nope.pth"):
        cli(["train", "--dataset", "waterbirds", "--root", root, "--weights",
             str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o"), "--no-progress"])


def tiny_bert(folder):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    os.makedirs(folder)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + fx.WORDS) + "\n")
    BertTokenizerFast(vocab_file=vocab).save_pretrained(folder)
    config = BertConfig(vocab_size=5 + len(fx.WORDS), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def test_civilcomments_with_a_local_bert_checkpoint(tmp_path):
    root = fx.civilcomments_folder(str(tmp_path / "cc"))
    bert = tiny_bert(str(tmp_path / "bert"))
    out = tmp_path / "out"
    run("--dataset", "civilcomments", "--root", root, "--bert", bert, "--out", str(out),
        "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "2", "--max-length", "16",
        "--no-progress")
    r = result_of(out)
    assert (r["config"]["optimizer"], r["config"]["lr"], r["config"]["c"]) == ("adamw", 1e-5, 1.0)
    assert r["beta"] == 0.0 and len(r["test"]["per_group"]) == 4


def test_civilcomments_without_bert_is_a_clear_error(tmp_path):
    root = fx.civilcomments_folder(str(tmp_path / "cc"))
    with pytest.raises(SystemExit, match="--bert PATH"):
        cli(["train", "--dataset", "civilcomments", "--root", root, "--no-progress",
             "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no config.json"):
        cli(["train", "--dataset", "civilcomments", "--root", root, "--bert", str(tmp_path),
             "--no-progress", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("dataset, build, expected", [
    ("waterbirds", None, "metadata.csv"),
    ("cmnist", None, "align/<class>/<idx>_<y>_<a>.png"),
    ("celeba", lambda root: fx.celeba_folder(root, with_partition=False),
     "list_eval_partition.csv"),
])
def test_missing_folder_or_split_file_names_the_path_and_layout(tmp_path, dataset, build,
                                                                 expected):
    root = str(tmp_path / "data")
    if build is not None:
        build(root)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli(["train", "--dataset", dataset, "--root", root, "--out", str(out), *TINY])
    message = str(info.value)
    assert "Expected layout" in message and expected in message and root in message
    assert not out.exists()  # refused before anything was written


def test_bad_settings_are_refused(tmp_path):
    root = fx.waterbirds_folder(str(tmp_path / "wb"))
    base = ["train", "--dataset", "waterbirds", "--root", root, "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="outside"):
        cli(base + ["--beta", "40", "--epochs", "1", *TINY])
    with pytest.raises(SystemExit, match=r"outside \[.*A=2"):  # the pseudo-groups' bounds
        cli(base + ["--beta", "40", "--attributes", "unknown", "--t", "0.25", *TINY])
    assert not (tmp_path / "o").exists()  # refused before anything was written
    with pytest.raises(SystemExit, match="does not fit"):
        cli(base + ["--model", "bert"])
    with pytest.raises(SystemExit, match="--c must be"):
        cli(base + ["--c", "1.5", *TINY])
    with pytest.raises(SystemExit, match="--epochs must be >= 1"):
        cli(base + ["--epochs", "0", *TINY])


def test_paper_settings_table_matches_the_paper():
    s = train_cli.PAPER_SETTINGS
    assert (s["waterbirds"].model, s["waterbirds"].head, s["waterbirds"].lr) == ("resnet50", "mlp", 1e-4)
    assert (s["celeba"].c, s["civilcomments"].c, s["cmnist"].c) == (0.5, 1.0, 0.5)
    assert (s["civilcomments"].optimizer, s["civilcomments"].lr) == ("adamw", 1e-5)
    assert (s["cmnist"].lr, s["cmnist"].lr_unknown) == (0.1, 0.01)
    assert s["ccifar10"].model == "resnet18"
