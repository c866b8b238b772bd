"""Datasets for GERNE: an offline Colored MNIST and loaders for the paper's benchmarks.

Every dataset yields ``(x, y, a)``: input, class label, attribute (bias) label. The
folder loaders read local copies in their usual release layouts (no downloads) and
expose ``labels`` and ``attributes`` tensors for :class:`gerne_kernels.TwoBatchSampler`.
"""
from ._folder import GroupImageDataset, to_tensor
from .celeba import celeba
from .civilcomments import CivilComments, civilcomments
from .colored_mnist import COLORS, GroupTensors, colored_mnist, load_digit_images
from .lff import colored_mnist_folder, corrupted_cifar10_folder, lff_folder
from .waterbirds import metadata_csv_dataset, waterbirds

__all__ = [
    "COLORS", "GroupTensors", "colored_mnist", "load_digit_images",
    "GroupImageDataset", "to_tensor", "waterbirds", "metadata_csv_dataset", "celeba",
    "CivilComments", "civilcomments", "lff_folder", "colored_mnist_folder",
    "corrupted_cifar10_folder",
]
