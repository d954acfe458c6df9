from setuptools import find_packages, setup

setup(
    name="unfused-dist",
    version="0.1.0",
    description="UnFuSeD (unsupervised fine-tuning by self-distillation) for audio encoders at distributed scale",
    packages=find_packages(include=["unfused_dist*", "launchers*", "shards_tools*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.2", "deepspeed>=0.14", "webdataset>=0.2.90", "numpy", "soundfile", "soxr",
        "pyyaml", "tqdm", "matplotlib", "safetensors", "scikit-learn", "prometheus-client",
        "torchaudio", "faiss-cpu",
    ],
    extras_require={
        "gpu": ["faiss-gpu-cu12"],
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
