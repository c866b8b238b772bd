"""The paper's models (App. F), built offline: pretrained weights come from a local file or
torchvision's cache, never from the network.

* ``mlp``: the 3-layer MLP of the Colored MNIST experiments (hidden 100) on flattened
  images;
* ``resnet18`` / ``resnet50``: torchvision's ResNets, ImageNet weights from
  ``weights=PATH`` or from ``$TORCH_HOME/hub/checkpoints/`` where torchvision keeps what it
  downloaded (``IMAGENET1K_V1``, else ``V2``); the classifier is a linear layer or, for
  Waterbirds and CelebA ("ResNet-50 + MLP head"), ``Linear(d, 512) - ReLU - Linear(512, K)``;
* ``bert``: a BERT checkpoint in a local folder (``config.json``, the weights and the
  tokenizer files, as ``save_pretrained`` writes them) read with transformers
  (``local_files_only``), with the MLP head on the [CLS] token's last hidden state.

A missing checkpoint is an error that names every place looked in and the way out
(``--weights PATH`` or ``--from-scratch``; ``--bert PATH``).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.nn as nn

__all__ = ["mlp", "resnet", "BertClassifier", "bert_classifier", "load_tokenizer",
           "pretrained_resnet_path", "mlp_head", "ChannelsLast"]

_RESNET = {"resnet18": ("resnet18", "ResNet18_Weights"), "resnet50": ("resnet50", "ResNet50_Weights")}


def mlp(in_features: int, num_classes: int, hidden: int = 100) -> nn.Module:
    """Flatten, then the 3-layer MLP of the paper's Colored MNIST experiments."""
    from .demo import make_mlp

    return nn.Sequential(nn.Flatten(), make_mlp(in_features, hidden, num_classes))


def mlp_head(in_features: int, num_classes: int, hidden: int = 512) -> nn.Module:
    """The MLP classifier head: ``Linear(d, hidden) - ReLU - Linear(hidden, K)``."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def _torchvision_cache_files(arch: str) -> List[str]:
    """The files torchvision's ImageNet weights of ``arch`` are cached as (V1, then V2)."""
    import torchvision.models as tvm

    enum = getattr(tvm, _RESNET[arch][1])
    return [os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
            for w in enum if w.name.startswith("IMAGENET1K")]


def pretrained_resnet_path(arch: str, weights: Optional[str] = None) -> str:
    """Where the ImageNet weights of ``arch`` are: ``weights`` if given (it must exist),
    else torchvision's cache; FileNotFoundError naming the places looked in otherwise."""
    looked: List[str] = []
    if weights is not None:
        if os.path.isfile(weights):
            return weights
        looked.append(weights)
    else:
        for cached in _torchvision_cache_files(arch):
            if os.path.isfile(cached):
                return cached
            looked.append(cached)
        looked[-1] += " (torchvision's cache, $TORCH_HOME/hub/checkpoints)"
    raise FileNotFoundError(
        f"no pretrained {arch} weights found; looked in: {', '.join(looked)}. Pass "
        f"--weights PATH (a torchvision {arch} ImageNet state_dict, e.g. "
        f"{os.path.basename(_torchvision_cache_files(arch)[0])}), copy it into torchvision's "
        "cache, or train with --from-scratch")


def resnet(arch: str, num_classes: int, *, head: str = "linear", pretrained: bool = True,
           weights: Optional[str] = None) -> nn.Module:
    """A torchvision ResNet with ImageNet weights (see the module docstring) and a new head."""
    import torchvision.models as tvm

    if arch not in _RESNET:
        raise ValueError(f"arch must be one of {sorted(_RESNET)}, got {arch!r}")
    model = getattr(tvm, _RESNET[arch][0])(weights=None)
    if pretrained:
        path = pretrained_resnet_path(arch, weights)
        state = torch.load(path, map_location="cpu", weights_only=True)
        # the ImageNet classifier is dropped: the head is replaced below
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"{path} is not a torchvision {arch} state_dict (missing "
                             f"{missing[:3]}..., unexpected {unexpected[:3]}...)")
    d = model.fc.in_features
    model.fc = nn.Linear(d, num_classes) if head == "linear" else mlp_head(d, num_classes)
    return model


class ChannelsLast(nn.Module):
    """Feeds the wrapped convnet channels_last inputs (its weights converted once)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - transformers is in the train extra
        raise SystemExit("CivilComments needs transformers: pip install 'gerne_kernels[train]'") \
            from exc


def _check_bert_folder(path: Optional[str]) -> str:
    if path is None:
        raise FileNotFoundError(
            "CivilComments needs a local BERT checkpoint: pass --bert PATH, a folder with "
            "config.json, the weights (model.safetensors or pytorch_model.bin) and the "
            "tokenizer files (vocab.txt, tokenizer_config.json), e.g. "
            "bert-base-uncased as written by save_pretrained(); nothing is downloaded")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"--bert {path!r}: no config.json there. Expected a folder written by "
            "save_pretrained(): config.json, model.safetensors (or pytorch_model.bin), "
            "vocab.txt, tokenizer_config.json")
    return path


class BertClassifier(nn.Module):
    """BERT encoder, MLP head on the [CLS] token; inputs are the tokenizer's dict."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = mlp_head(encoder.config.hidden_size, num_classes,
                             hidden=encoder.config.hidden_size)

    def forward(self, x: dict) -> torch.Tensor:
        return self.head(self.encoder(**x).last_hidden_state[:, 0])


def bert_classifier(path: Optional[str], num_classes: int) -> BertClassifier:
    """A :class:`BertClassifier` from the local checkpoint folder ``path``."""
    _require_transformers()
    from transformers import AutoModel

    return BertClassifier(AutoModel.from_pretrained(_check_bert_folder(path),
                                                    local_files_only=True), num_classes)


def load_tokenizer(path: Optional[str]):
    """The tokenizer saved with the local BERT checkpoint ``path``."""
    _require_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_check_bert_folder(path), local_files_only=True)
