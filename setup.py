"""Packaging for dynamo_sampling. Users bring their own torch; the Makefile pins the CPU wheel."""
import re
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

CSRC = Path(__file__).resolve().parent / "csrc"
VERSION = re.search(r'^__version__ = "([^"]+)"', (CSRC.parent / "dynamo_sampling" / "__init__.py").read_text(),
                    re.M).group(1)  # one place for the version: the package's __version__


class build_py(_build_py):
    """Also ship the repository's top-level ``csrc/*.cu`` / ``*.cuh`` / ``*.c`` (the CUDA kernels that
    ``dynamo_sampling.kernels`` and the C policy that ``dynamo_sampling.cpu_policy`` compile at run time)
    inside the package, as ``dynamo_sampling/csrc/``.
    Editable installs skip the copy: the loader falls back to the repository's ``csrc/``."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dst = Path(self.build_lib) / "dynamo_sampling" / "csrc"
        self.mkpath(str(dst))
        for src in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")) + sorted(CSRC.glob("*.c")):
            self.copy_file(str(src), str(dst / src.name))


setup(
    name="dynamo_sampling",
    version=VERSION,
    description="Dynamic multi-token sampling (DynaMo) and self-speculative decoding for MTP language models",
    packages=find_packages(include=["dynamo_sampling", "dynamo_sampling.*"]),
    package_data={"dynamo_sampling": ["csrc/*.cu", "csrc/*.cuh", "csrc/*.c", "pretrained/*"]},
    cmdclass={"build_py": build_py},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy>=1.24", "safetensors>=0.4", "tokenizers>=0.15", "tqdm>=4.60"],
    extras_require={
        "cuda": ["cupy-cuda13x"],  # the CUDA 13 wheel; CUDA 12 users install cupy-cuda12x themselves
        "hf": ["transformers>=4.48"],
        "dev": ["pytest>=7", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib>=3.6"],
    },
    entry_points={"console_scripts": ["dynamo-sampling=dynamo_sampling.cli:main"]},
)
