"""Catching up in a workshop: take an earlier chapter's stored result instead of running that chapter.

A learner who fell behind sets ``PHI3_LAB_CATCH_UP=1`` (in the shell before starting Jupyter, or as the first line
of the notebook: ``import os; os.environ["PHI3_LAB_CATCH_UP"] = "1"``) and runs the chapter the room is on. When
that chapter asks for an earlier chapter's output that is missing (:func:`utils.models.require_output`,
:func:`utils.data.load_splits`), the stored copy shipped in ``models/catch-up/`` is copied into ``outputs/`` and a
line says so. The stored results were made by the offline default on the shipped miniature, so they are refused
for any other model. What the learner already has is never overwritten, and their own later run replaces the copy.

Maintainers refresh the stored results after a fresh run (``make catch-up-results``, :func:`store`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from utils import config

SWITCH = "PHI3_LAB_CATCH_UP"
STORED_DIR: Path = config.PROJECT_ROOT / "models" / "catch-up"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StoredResult:
    """One earlier chapter's result, as a path under the output folder."""

    path: str  # relative to the output folder, e.g. "adapters/lora"
    chapter: str  # the notebook that writes it
    merged_from: str | None = None  # rebuilt by merging this stored adapter into the base (not stored itself)
    dequantized: bool = False  # merge into the NF4-rounded weights the adapter was trained on (QLoRA)


RESULTS: tuple[StoredResult, ...] = (
    StoredResult("data", "01_data_preparation.ipynb"),
    StoredResult("adapters/loralib", "02_lora_from_scratch.ipynb"),
    StoredResult("adapters/lora", "03_lora_finetuning.ipynb"),
    StoredResult("adapters/qlora", "04_qlora_finetuning.ipynb"),
    StoredResult("adapters/lora_merged", "04_qlora_finetuning.ipynb", merged_from="adapters/lora"),
    StoredResult("adapters/qlora_merged", "04_qlora_finetuning.ipynb", merged_from="adapters/qlora", dequantized=True),
)
# Chapter 06's eval/results.json is not stored: chapter 06 itself runs in about a minute once the adapters are there
# (with the switch on it takes them from here), and only the optional chapter 07 reads its results.
# What is not worth shipping: the trainer's pickled arguments and datasets' cache files.
SKIP = ("training_args.bin", "cache-*.arrow")


def enabled() -> bool:
    """True when the learner has switched catch-up on (``PHI3_LAB_CATCH_UP=1``)."""
    return os.environ.get(SWITCH, "").strip().lower() in ("1", "true", "yes", "on")


def result_for(path: str | Path) -> StoredResult | None:
    """The stored result that holds ``path`` (the result's folder or a file inside it), or None."""
    try:
        relative = Path(path).resolve().relative_to(config.outputs_dir())
    except ValueError:
        return None
    for result in RESULTS:
        if relative == Path(result.path) or Path(result.path) in relative.parents:
            return result
    return None


def _check_model_and_base() -> str:
    """The stored results' base fingerprint, after checking they fit the configured model; SettingsError if not."""
    from utils.adapters import base_fingerprint

    if not config.is_miniature():
        raise config.SettingsError(
            f"{SWITCH}=1: the stored results belong to the shipped miniature Phi-3, not to {config.model_id()}; "
            f"run the earlier chapters with your model instead (or unset {SWITCH}).")
    manifest = STORED_DIR / MANIFEST
    if not manifest.is_file():
        raise config.SettingsError(f"{manifest} is missing: the stored results are not there "
                                   "(maintainers: make catch-up-results after a fresh run).")
    stored = json.loads(manifest.read_text())["base_fingerprint"]
    if stored != base_fingerprint(config.miniature_dir()):
        raise config.SettingsError(
            f"{STORED_DIR.relative_to(config.PROJECT_ROOT)}/ was made on another build of the miniature than the one "
            "in models/phi3-miniature/; run the earlier chapters yourself (maintainers: make catch-up-results).")
    return stored


def restore(path: str | Path, chapter: str) -> bool:
    """Copy the stored result that holds the missing ``path`` into the output folder, saying so; False if none.

    Does nothing (False) when the switch is off, ``path`` is no stored result, or the learner already has that
    result's folder or file. Stops with :class:`config.SettingsError` on another model or a stale stored copy.
    """
    result = result_for(path)
    if not enabled() or result is None:
        return False
    target = config.outputs_dir() / result.path
    if target.exists():
        return False
    _check_model_and_base()
    config.check_outputs_dir()
    if result.merged_from:
        from utils.quantization import merge_adapter_into_full_precision

        adapter = config.outputs_dir() / result.merged_from
        if not adapter.exists():
            restore(adapter, result.chapter)
        merge_adapter_into_full_precision(config.model_path(), adapter, target, dequantized=result.dequantized)
        how = f"merged from the stored {result.merged_from}/ as notebooks/{result.chapter} does"
    else:
        _copy(STORED_DIR / result.path, target)
        how = f"copied from {STORED_DIR.relative_to(config.PROJECT_ROOT)}/{result.path}"
    print(f"catch-up ({SWITCH}=1): {result.path} was missing, so this uses the STORED result of "
          f"notebooks/{result.chapter} on the miniature ({how}), not your own run.")
    return True


def _copy(source: Path, target: Path) -> None:
    """Copy a file or folder aside, then rename it into place (an interruption leaves nothing half-copied)."""
    from utils.atomic import staging_path

    if not source.exists():
        raise config.SettingsError(f"{source} is missing: the stored results are incomplete "
                                   "(maintainers: make catch-up-results after a fresh run).")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target, "catch-up")
    if staging.is_dir():
        shutil.rmtree(staging)
    if source.is_dir():
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(*SKIP))
    else:
        shutil.copy2(source, staging)
    staging.rename(target)


def store(outputs: Path | None = None, destination: Path | None = None) -> list[str]:
    """Maintainers: copy a fresh miniature run's results (chapters 01-04) from ``outputs`` into ``models/catch-up/``; the paths.

    Refuses results made on another model or another build of the miniature (their adapters record their base).
    """
    from utils.adapters import base_fingerprint, read_record
    from utils.atomic import atomic_folder

    outputs = Path(outputs or config.outputs_dir())
    destination = Path(destination or STORED_DIR)
    fingerprint = base_fingerprint(config.miniature_dir())
    stored = [result for result in RESULTS if result.merged_from is None]
    for result in stored:
        source = outputs / result.path
        if not source.exists():
            raise config.SettingsError(f"{source} is missing: run notebooks/{result.chapter} on the miniature first.")
        record = read_record(source) if source.is_dir() else None
        if source.is_dir() and result.path.startswith("adapters/") and (record or {}).get("fingerprint") != fingerprint:
            raise config.SettingsError(f"{source} was not trained on the shipped miniature; re-run "
                                       f"notebooks/{result.chapter} with the offline default first.")
    with atomic_folder(destination) as staging:
        for result in stored:
            source, target = outputs / result.path, staging / result.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns(*SKIP))
                record_file = target / "base_model.json"
                if record_file.is_file():  # the maintainer's absolute path means nothing on a learner's machine
                    record = json.loads(record_file.read_text())
                    record["base_model"] = "models/phi3-miniature"
                    record_file.write_text(json.dumps(record, indent=2) + "\n")
                for text_file in (target / "adapter_config.json", target / "README.md"):
                    if text_file.is_file():
                        text = text_file.read_text().replace(str(config.miniature_dir()), "models/phi3-miniature")
                        text_file.write_text(text)
            else:
                shutil.copy2(source, target)
        manifest = {"base_fingerprint": fingerprint,
                    "results": {result.path: result.chapter for result in stored}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return [result.path for result in stored]


def main() -> int:
    """``python -m utils.catch_up store``: refresh models/catch-up/ from outputs/ (make catch-up-results)."""
    import sys

    if sys.argv[1:] != ["store"]:
        print("usage: python -m utils.catch_up store   (copies a fresh miniature run's results into models/catch-up/)",
              file=sys.stderr)
        return 2
    try:
        paths = store()
    except config.SettingsError as err:
        print(f"catch-up: {err}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in STORED_DIR.rglob("*") if f.is_file())
    print(f"stored {', '.join(paths)} in {STORED_DIR.relative_to(config.PROJECT_ROOT)}/ ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
