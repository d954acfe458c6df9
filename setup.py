from setuptools import find_packages, setup

setup(
    name="unfused-dist",
    version="0.1.0",
    description="UnFuSeD (unsupervised fine-tuning by self-distillation) for audio encoders at distributed scale",
    packages=find_packages(include=["unfused_dist*", "launchers*", "shards_tools*"]),
    python_requires=">=3.10",
    # Tested: torch 2.13 (CPU) and 2.11 (CUDA), torchaudio 2.11 (its pure-PyTorch transforms only), DeepSpeed
    # 0.19 (the engine reads its ZeRO checkpoint layout and engine internals: other minors are untested).
    install_requires=[
        "torch>=2.4", "deepspeed>=0.19,<0.20", "webdataset>=0.2.90", "numpy", "soundfile", "soxr",
        "pyyaml", "tqdm", "matplotlib", "safetensors", "scikit-learn", "prometheus-client",
        "torchaudio>=2.4,<2.12",
    ],
    # faiss comes in one of two builds that install the same `faiss` package, so neither is a base
    # requirement: `.[cpu]` or `.[gpu]` (CUDA 12). Without either, the pseudolabel stage says which to install.
    extras_require={
        "cpu": ["faiss-cpu>=1.8"],
        "gpu": ["faiss-gpu-cu12>=1.8"],
        "slurm": ["submitit>=1.5"],
        "dev": ["pytest", "pytest-timeout", "tinysoundfont"],
    },
    entry_points={
        "console_scripts": [
            "unfused=launchers.cli:main",
            "unfused-shards=shards_tools.cli:main",
        ]
    },
)
