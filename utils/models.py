"""Hardware report and model loading: the same ``from_pretrained`` path for the miniature and the real Phi-3."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from utils import config


@dataclass(frozen=True)
class Hardware:
    """What the current machine supports, and the choices the chapters derive from it."""

    device: str
    device_name: str
    torch_version: str
    cuda_version: str | None
    bf16: bool
    dtype: torch.dtype
    attn_implementation: str

    def as_rows(self) -> list[tuple[str, str]]:
        """The report as (setting, value) rows for a table."""
        return [("device", f"{self.device} ({self.device_name})"), ("torch", self.torch_version),
                ("CUDA", self.cuda_version or "none"), ("bf16 supported", str(self.bf16)),
                ("training dtype", str(self.dtype).replace("torch.", "")),
                ("attention implementation", self.attn_implementation)]


def hardware_report() -> Hardware:
    """Device, precision and attention implementation the series will use on this machine.

    bf16 where the GPU computes it natively (Ampere or newer; a T4 only emulates it, slowly), else fp16 with loss
    scaling on a GPU, fp32 on CPU; ``flash_attention_2`` only when the
    package is installed and the GPU is Ampere or newer, else PyTorch's ``sdpa``.
    """
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        flash = importlib.util.find_spec("flash_attn") is not None and torch.cuda.get_device_capability()[0] >= 8
        return Hardware("cuda", torch.cuda.get_device_name(), torch.__version__, torch.version.cuda, bf16,
                        torch.bfloat16 if bf16 else torch.float16, "flash_attention_2" if flash else "sdpa")
    import platform

    return Hardware("cpu", platform.processor() or platform.machine(), torch.__version__, None, False,
                    torch.float32, "sdpa")


def require_miniature_or_model() -> str:
    """The ``from_pretrained`` path of the configured model: the shipped miniature's folder, or ``PHI3_MODEL_ID``.

    Checks the settings first (``config.check_settings``): a wrong ``PHI3_MODEL_ID`` or ``PHI3_LAB_OUTPUTS`` stops
    here with one :class:`utils.config.SettingsError` saying what to change.
    """
    config.check_settings()
    if config.is_miniature():
        from utils.miniature import require_shipped_miniature

        return str(require_shipped_miniature())
    return check_model(config.model_id())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_warned_types: set[str] = set()


def check_model(path: str) -> str:
    """``path`` after checking the model it names without loading it: warns when ``model_type`` is not ``phi3`` (the
    series is written for Phi-3), stops with :class:`utils.config.SettingsError` when a local folder has no
    tokenizer or no chat template. A hub id not downloaded yet is left to ``from_pretrained``."""
    import json
    import warnings

    from utils.adapters import resolve_model_folder

    local = Path(path).expanduser().is_dir()
    try:
        folder = resolve_model_folder(path)
        settings = json.loads((folder / "config.json").read_text())
    except (config.SettingsError, OSError, ValueError):
        return path
    model_type = settings.get("model_type")
    if model_type != "phi3" and path not in _warned_types:
        _warned_types.add(path)
        warnings.warn(f"{path} is a {model_type!r} model, not Phi-3: the series (chat template, target modules such "
                      "as qkv_proj, loralib's fused-projection chapter) is written for Phi-3 and may fail or "
                      "mislead on it", stacklevel=2)
    if not local:
        return path
    missing = []
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        tokenizer_config = {}
    if not (tokenizer_config.get("chat_template") or (folder / "chat_template.jinja").is_file()
            or (folder / "chat_template.json").is_file()):
        missing.append("chat template (tokenizer_config.json's chat_template or chat_template.jinja)")
    if missing:
        raise config.SettingsError(f"PHI3_MODEL_ID={path}: the folder has no {' and no '.join(missing)}; the "
                                   "chapters format every conversation with it. Copy the tokenizer files of the model "
                                   "into the folder (tokenizer.save_pretrained(folder)), or use a Phi-3 checkpoint.")
    return path


def load_tokenizer(path: str | None = None) -> Any:
    """The configured model's tokenizer (Phi-3's chat template and special tokens).

    A template that writes what Phi-3's writes but is spelled differently becomes TRL's copy, so that TRL can mask
    it (``utils.prompts.ensure_trainable_template``); any other stops with a clear message.
    """
    from transformers import AutoTokenizer

    from utils.prompts import ensure_trainable_template

    path = path or require_miniature_or_model()
    return ensure_trainable_template(AutoTokenizer.from_pretrained(path), name=path)


def load_model(path: str | None = None, hardware: Hardware | None = None, training: bool = False,
               quantization_config: Any | None = None, dtype: torch.dtype | None = None) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with dtype and attention from the hardware report.

    ``training=True`` sets ``use_cache=False`` (the KV cache is useless when training and costs memory).
    No ``trust_remote_code``: Phi-3 is a native transformers architecture.
    """
    from transformers import AutoModelForCausalLM

    hw = hardware or hardware_report()
    kwargs: dict[str, Any] = {"dtype": dtype or hw.dtype, "attn_implementation": hw.attn_implementation}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if hw.device == "cuda":
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(path or require_miniature_or_model(), **kwargs)
    if training:
        model.config.use_cache = False
    return model


def merge_save_dtype(hardware: Hardware, base_path: str) -> torch.dtype:
    """The dtype to save a merged model in: the one it computes in on a GPU (bf16, fp16 on a T4); on a CPU, which
    computes in fp32, the base checkpoint's own dtype.

    So a CPU run writes what a GPU run writes: Phi-3 Mini's merges in bf16, like its checkpoint (7.6 GB each, not
    15), which chapter 07 exports without an fp32 copy in host RAM, and the miniature's in fp32, like its own.
    """
    if hardware.device == "cuda":
        return hardware.dtype
    from transformers import AutoConfig

    stored = AutoConfig.from_pretrained(base_path).dtype  # a torch.dtype, or None where the config names none
    return stored if isinstance(stored, torch.dtype) else torch.float32


def release_memory() -> None:
    """Return the memory of models no longer referenced (after ``del model``) to the system or the GPU's pool.

    ``del`` only drops a name; Python frees a model once nothing refers to it (cycles need ``gc.collect()``), and
    PyTorch keeps freed GPU memory cached for itself until ``torch.cuda.empty_cache()``. On Linux, the C library
    keeps freed small and medium blocks (activations, logits) in its heap for reuse: ``malloc_trim`` hands them back,
    so the next model has the room and the process's size says what it really holds.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def require_output(path: Path, chapter: str) -> Path:
    """``path`` if it exists; otherwise stop with a message naming the chapter that writes it.

    With the workshop's catch-up switch on (``PHI3_LAB_CATCH_UP=1``, :mod:`utils.catch_up`) a missing result of an
    earlier chapter is first taken from the stored copy, with a line saying so.
    """
    from utils import catch_up

    if not Path(path).exists() and not catch_up.restore(path, chapter):
        raise FileNotFoundError(f"{path} is missing: run notebooks/{chapter} first (it writes this file), or set "
                                f"{catch_up.SWITCH}=1 to use its stored result.")
    return Path(path)
