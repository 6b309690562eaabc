"""sparo-fast: a fast, faithful SPARO read-out (ECCV 2024) for CLIP, with Triton kernels."""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

setup(
    name="sparo-fast",
    version="0.1.0",
    description="Fused Triton kernels and a bf16 FSDP trainer for SPARO CLIP read-outs",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The repository keeps `kernels/` and `training/` at the top level; they are installed
    # under specific names so that no generic `kernels` or `training` lands in site-packages.
    packages=["sparo_fast", "sparo_fast.clip", "sparo_fast_kernels", "sparo_fast_kernels.testing",
              "sparo_fast_training", "sparo_fast_experiment"],
    package_dir={
        "sparo_fast": "sparo_fast",
        "sparo_fast.clip": "sparo_fast/clip",
        "sparo_fast_kernels": "kernels",
        "sparo_fast_kernels.testing": "kernels/testing",
        "sparo_fast_training": "training",
        "sparo_fast_experiment": "experiment",
    },
    package_data={"sparo_fast.clip": ["model_configs/*.json"]},
    # torch 2.6: torch.library.triton_op / wrap_triton (the fused op); Triton 3.4: the oldest
    # release that compiles the kernels spill-free (bench/results/compile-matrix.json; 3.3.1
    # rejects an explicit None accumulator in tl.dot). PyTorch's Linux wheels pin their Triton, so
    # triton>=3.4 comes with torch>=2.8 there.
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton>=3.4"],
        "clip": ["open_clip_torch>=2.24", "torchvision", "pillow", "matplotlib>=3.5"],  # matplotlib: the visualiser's font
        "train": ["open_clip_torch>=2.24", "torchvision", "pillow", "webdataset>=0.2.86", "tensorboard>=2.14",
                  "matplotlib>=3.5"],
        "bench": ["pytest>=7", "pytest-benchmark>=4"],
        "dev": [
            "open_clip_torch>=2.24", "torchvision", "pillow", "webdataset>=0.2.86", "tensorboard>=2.14",
            "matplotlib>=3.5",
            "pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3", "hypothesis>=6",
            "triton>=3.4; platform_system == 'Linux'",
        ],
    },
)
