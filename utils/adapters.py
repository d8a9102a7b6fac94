"""Adapters know their base: a fingerprint of the base's weights is saved with every adapter and checked on load.

An adapter holds only the *difference* to the weights it was trained on. Loaded onto another base of the same shape
(a rebuilt miniature, another checkpoint) it loads without a word and answers wrongly, so each adapter folder gets
a ``base_model.json`` (the base as given, a fingerprint of its weights, its vocabulary size) and the loaders
compare it with the base they are given.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from pathlib import Path
from typing import Any

from utils.config import SettingsError

RECORD_FILE = "base_model.json"
WHOLE_FILE_BYTES = 64 * 2**20  # files up to this size are hashed whole
SAMPLES_PER_TENSOR = 16  # larger files: this many evenly spaced chunks of each tensor
SAMPLE_BYTES = 4096
ALLOW_ENV = "PHI3_ALLOW_BASE_MISMATCH"

_warned: set[str] = set()


class AdapterBaseMismatch(SettingsError):
    """An adapter loaded onto a base other than the one it was trained on; the message names both and the fix."""


def resolve_model_folder(model_path: str | Path) -> Path:
    """The local folder of a model: the path itself, or a hub id's snapshot in the local cache (never the network)."""
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(model_path), local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        raise SettingsError(f"{model_path}: neither a local folder nor in the local Hugging Face cache; download it "
                            "once (e.g. load it with network access) or give a local folder") from None


def _tensors(file: Path) -> tuple[int, dict[str, dict]]:
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def base_fingerprint(model_path: str | Path) -> str:
    """A hash of a checkpoint's weights (its ``*.safetensors`` files): same weights, same fingerprint.

    Per tensor, in name order (so sharding and file order do not matter): name, dtype, shape, and the bytes: all of
    them in files up to 64 MiB, else 16 evenly spaced 4 KiB chunks (about 12 MB read for Phi-3 Mini's 7.6 GB, well
    under a second from a warm disk). A retrained or rebuilt base changes every tensor, so it changes the fingerprint.
    """
    folder = resolve_model_folder(model_path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SettingsError(f"{folder}: no *.safetensors weights to fingerprint; give the folder of a saved model")
    entries: list[tuple[str, Path, int, dict, bool]] = []
    for file in files:
        start, header = _tensors(file)
        whole = file.stat().st_size <= WHOLE_FILE_BYTES
        entries += [(name, file, start, info, whole) for name, info in header.items()]
    digest = hashlib.sha256()
    handles: dict[Path, Any] = {}
    try:
        for name, file, start, info, whole in sorted(entries, key=lambda e: e[0]):
            f = handles.setdefault(file, open(file, "rb"))
            digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            begin, end = (start + offset for offset in info["data_offsets"])
            length = end - begin
            if whole or length <= SAMPLES_PER_TENSOR * SAMPLE_BYTES:
                f.seek(begin)
                digest.update(f.read(length))
                continue
            step = (length - SAMPLE_BYTES) / (SAMPLES_PER_TENSOR - 1)
            for i in range(SAMPLES_PER_TENSOR):
                f.seek(begin + int(i * step))
                digest.update(f.read(SAMPLE_BYTES))
    finally:
        for f in handles.values():
            f.close()
    return "sha256:" + digest.hexdigest()


def _vocab_size(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tokenizer_size(folder: Path) -> int | None:
    """Highest token id + 1 of the ``tokenizer.json`` saved in a folder (an adapter's), or None without one."""
    try:
        data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vocab = data.get("model", {}).get("vocab", {})
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    ids += [t["id"] for t in data.get("added_tokens", [])]
    return max(ids) + 1 if ids else None


def portable_path(value: str | Path) -> str:
    """A path as an adapter may record it: relative to the project folder when inside it, ``~/...`` when under the
    home folder; anything else (a hub id, another folder) as given."""
    from utils.config import PROJECT_ROOT

    text = str(value)
    path = Path(text)
    if not path.is_absolute():
        return text
    if path.is_relative_to(PROJECT_ROOT):
        return path.relative_to(PROJECT_ROOT).as_posix() or "."
    home = Path.home()
    return f"~/{path.relative_to(home).as_posix()}" if path.is_relative_to(home) and path != home else text


# What trainer.save_model leaves that does not belong in an adapter one hands on: a pickle of the training
# arguments (unpickling runs code) and, in adapter_config.json and the model card, this machine's absolute paths.
PICKLED_FILES = ("training_args.bin",)
TEXT_FILES_WITH_PATHS = ("adapter_config.json", "README.md")


def make_portable(adapter_dir: str | Path) -> None:
    """Remove pickles from a saved adapter folder and write its local paths relative (see :func:`portable_path`)."""
    from utils.atomic import atomic_write
    from utils.config import PROJECT_ROOT

    adapter_dir = Path(adapter_dir)
    for name in PICKLED_FILES:
        (adapter_dir / name).unlink(missing_ok=True)
    prefixes = [(f"{PROJECT_ROOT}/", ""), (f"{Path.home()}/", "~/")]
    for name in TEXT_FILES_WITH_PATHS:
        file = adapter_dir / name
        if not file.is_file():
            continue
        text = file.read_text(encoding="utf-8")
        fixed = text
        for prefix, short in prefixes:
            fixed = fixed.replace(prefix, short)
        if fixed != text:
            atomic_write(file, fixed)


def record_base(adapter_dir: str | Path, model_path: str | Path) -> Path:
    """Write ``base_model.json`` (the base as given, its weights' fingerprint, its vocabulary size) into an adapter,
    and make the folder portable (:func:`make_portable`: no pickled ``training_args.bin``, no absolute paths)."""
    from utils.atomic import atomic_write_json

    folder = resolve_model_folder(model_path)
    record = {"base_model": portable_path(model_path), "fingerprint": base_fingerprint(folder),
              "vocab_size": _vocab_size(folder)}
    path = atomic_write_json(Path(adapter_dir) / RECORD_FILE, record)
    make_portable(adapter_dir)
    return path


def read_record(adapter_dir: str | Path) -> dict | None:
    """An adapter's ``base_model.json``, or None for adapters saved before bases were recorded."""
    path = Path(adapter_dir) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_adapter_base(adapter_dir: str | Path, model_path: str | Path, allow_mismatch: bool = False) -> dict | None:
    """Stop with :class:`AdapterBaseMismatch` when ``model_path`` is not the base the adapter was trained on.

    ``allow_mismatch=True`` (or ``PHI3_ALLOW_BASE_MISMATCH=1``) turns a different fingerprint into a warning. A base
    whose vocabulary is smaller than the adapter's always stops (it would fail later with an ``IndexError``).
    Adapters without a record load with a one-time warning. Returns the record (None when there is none).
    """
    adapter_dir = Path(adapter_dir)
    folder = resolve_model_folder(model_path)
    record = read_record(adapter_dir)
    base_vocab = _vocab_size(folder)
    needed = [n for n in ((record or {}).get("vocab_size"), tokenizer_size(adapter_dir)) if n]
    if base_vocab is not None and needed and max(needed) > base_vocab:
        raise AdapterBaseMismatch(
            f"{adapter_dir}: this adapter uses token ids up to {max(needed) - 1}, but the base {model_path} has only "
            f"{base_vocab} tokens: it was trained on another base"
            + (f" ({record['base_model']})" if record else "")
            + ". Load it onto the base it was trained on, or retrain it on this one.")
    if record is None:
        if str(adapter_dir) not in _warned:
            _warned.add(str(adapter_dir))
            warnings.warn(f"{adapter_dir} does not record which base it was trained on ({RECORD_FILE} is missing), "
                          f"so loading it onto {model_path} cannot be checked; retrain it to record its base.",
                          stacklevel=2)
        return None
    given = base_fingerprint(folder)
    if given != record["fingerprint"]:
        allow = allow_mismatch or os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")
        message = (f"{adapter_dir} was trained on the base {record['base_model']} (weights {record['fingerprint'][:19]}"
                   f"...), but the base given is {model_path} (weights {given[:19]}...): an adapter on other weights "
                   "gives wrong answers without any error. Retrain the adapter on this base (re-run the chapter that "
                   f"wrote it), or load it anyway with allow_mismatch=True (or {ALLOW_ENV}=1).")
        if not allow:
            raise AdapterBaseMismatch(message)
        warnings.warn(message.replace("Retrain", "Loading anyway, as allowed; retrain"), stacklevel=2)
    return record


def record_base_callback(model_path: str | Path) -> Any:
    """A ``TrainerCallback`` that writes ``base_model.json`` into every checkpoint the trainer saves (main process
    only), so that resuming a checkpoint onto another base is refused like loading an adapter onto one."""
    from transformers import TrainerCallback

    from utils.atomic import atomic_write_json

    class RecordBase(TrainerCallback):
        record: dict | None = None

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not state.is_world_process_zero or not folder.is_dir():
                return
            if self.record is None:
                base = resolve_model_folder(model_path)
                self.record = {"base_model": portable_path(model_path), "fingerprint": base_fingerprint(base),
                               "vocab_size": _vocab_size(base)}
            atomic_write_json(folder / RECORD_FILE, self.record)

    return RecordBase()
