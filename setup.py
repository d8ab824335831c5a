"""Packaging for dynamo_sampling. Users bring their own torch; the Makefile pins the CPU wheel."""
from setuptools import find_packages, setup

setup(
    name="dynamo_sampling",
    version="0.1.0",
    description="Dynamic multi-token sampling (DynaMo) and self-speculative decoding for MTP language models",
    packages=find_packages(include=["dynamo_sampling", "dynamo_sampling.*"]),
    package_data={"dynamo_sampling": ["csrc/*.cu", "csrc/*.cuh", "pretrained/*"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy>=1.24", "scipy>=1.10", "safetensors>=0.4", "tokenizers>=0.15", "tqdm>=4.60"],
    extras_require={
        "cuda": ["cupy-cuda12x"],
        "hf": ["transformers>=4.40"],
        "dev": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib>=3.6"],
    },
    entry_points={"console_scripts": ["dynamo-sampling=dynamo_sampling.cli:main"]},
)
