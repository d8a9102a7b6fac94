"""One place for paths and settings; environment variables switch the whole series.

- ``PHI3_MODEL_ID``: ``miniature`` (default, offline) or a hub id / local path of a Phi-3 checkpoint,
  e.g. ``microsoft/Phi-3-mini-4k-instruct``.
- ``PHI3_LAB_OUTPUTS``: where everything the notebooks produce goes (default ``<project>/outputs``).

The miniature itself is not an output: it is built once by ``make miniature`` and shipped in ``models/``, so every
learner starts from the same base at once.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT: Path = Path(__file__).resolve().parent.parent
DATA_DIR: Path = PROJECT_ROOT / "data"
DATASET_TRAIN: Path = DATA_DIR / "house_format_train.jsonl"
DATASET_TEST: Path = DATA_DIR / "house_format_test.jsonl"

MINIATURE = "miniature"
REAL_PHI3 = "microsoft/Phi-3-mini-4k-instruct"


def outputs_dir() -> Path:
    """The folder that receives everything the series writes (writers create the sub-folders they need)."""
    return Path(os.environ.get("PHI3_LAB_OUTPUTS", PROJECT_ROOT / "outputs")).resolve()


def model_id() -> str:
    """The model the series fine-tunes: ``miniature`` or a Phi-3 hub id / local path."""
    return os.environ.get("PHI3_MODEL_ID", MINIATURE).strip() or MINIATURE


def is_miniature() -> bool:
    """True when the series runs on the offline miniature Phi-3."""
    return model_id() == MINIATURE


MINIATURE_DIR: Path = PROJECT_ROOT / "models" / "phi3-miniature"


def miniature_dir() -> Path:
    """The shipped miniature Phi-3 (weights, tokenizer, build report), built once by ``make miniature``."""
    return MINIATURE_DIR


def model_path() -> str:
    """What to pass to ``from_pretrained``: the cached miniature's folder or the configured id."""
    return str(miniature_dir()) if is_miniature() else model_id()


def split_dir() -> Path:
    """Train/test splits written by chapter 01 for the later chapters."""
    return outputs_dir() / "data"


def adapter_dir(name: str) -> Path:
    """Folder of a saved adapter (``lora``, ``qlora``, ``loralib``) or merged model."""
    return outputs_dir() / "adapters" / name


def model_tag() -> str:
    """A short, file-name-safe name for the configured model, used in plot titles and reports."""
    return "miniature Phi-3" if is_miniature() else model_id()


def silence_library_noise() -> None:
    """Keep notebook outputs readable: no per-file progress bars, deprecation chatter or optional-kernel notes.

    Training progress (the trainer's own bar or table) and real errors still show.
    """
    import logging
    import warnings

    for name in ("bitsandbytes", "transformers", "datasets", "peft", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|transformers|peft|trl|bitsandbytes)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
