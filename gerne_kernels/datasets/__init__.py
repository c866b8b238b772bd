"""Datasets for GERNE: an offline Colored MNIST and loaders for the paper's benchmarks.

Every dataset yields ``(x, y, a)``: input, class label, attribute (bias) label.
"""
from .colored_mnist import COLORS, GroupTensors, colored_mnist, load_digit_images

__all__ = ["COLORS", "GroupTensors", "colored_mnist", "load_digit_images"]
