"""Installs gerne_kernels. Nothing is compiled here: the C++/CUDA sources in csrc/ ship inside
the package and are compiled on first use (torch.utils.cpp_extension with ninja)."""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as gerne_kernels/csrc."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "gerne_kernels", "csrc")
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.copytree(os.path.join(HERE, "csrc"), target,
                        ignore=shutil.ignore_patterns("*.o", "*.so", "__pycache__"))


setup(
    name="gerne_kernels",
    version="0.1.0",
    description="GERNE debiasing optimizer for PyTorch with fused C++/CUDA/Triton kernels",
    long_description=open(os.path.join(HERE, "README.md")).read()
    if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gerne_kernels", "gerne_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11,<2.15", "ninja", "numpy"],
    extras_require={
        "demo": ["scikit-learn", "mlxtend", "matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn", "mlxtend",
                 "matplotlib", "tqdm", "pillow", "expecttest", "torchvision", "lightning>=2.4",
                 "transformers>=4.46.2", "accelerate>=1.0", "timm>=1.0"],
        "train": ["tqdm", "pillow", "torchvision", "transformers>=4.46.2"],
    },
    cmdclass={"build_py": BuildPyWithSources},
    entry_points={"console_scripts": ["gerne-kernels=gerne_kernels.__main__:main"]},
)
