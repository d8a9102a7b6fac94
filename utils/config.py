"""One place for paths and settings; environment variables switch the whole series.

- ``PHI3_MODEL_ID``: ``miniature`` (default, offline) or a hub id / local path of a Phi-3 checkpoint,
  e.g. ``microsoft/Phi-3-mini-4k-instruct``.
- ``PHI3_LAB_OUTPUTS``: where everything the notebooks produce goes (default ``<project>/outputs``; a relative
  value is taken from the project folder, ``~`` is expanded; never inside the project's own folders).
- ``PHI3_LAB_MAX_STEPS`` and ``PHI3_LAB_HELDOUT``: a short run, to check that a model and a machine get through
  every chapter before spending hours on it: at most that many optimizer steps per training run, and only the first
  that many held-out conversations evaluated (whole numbers from 1 to ``MAX_STEPS_LIMIT`` / ``HELDOUT_LIMIT``).
  Unset (the default) for real results.

The miniature itself is not an output: it is built once by ``make miniature`` and shipped in ``models/``, so every
learner starts from the same base at once.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT_ROOT: Path = Path(__file__).resolve().parent.parent
DATA_DIR: Path = PROJECT_ROOT / "data"
DATASET_TRAIN: Path = DATA_DIR / "house_format_train.jsonl"
DATASET_TEST: Path = DATA_DIR / "house_format_test.jsonl"

MINIATURE = "miniature"
REAL_PHI3 = "microsoft/Phi-3-mini-4k-instruct"


class SettingsError(RuntimeError):
    """A wrong setting (environment variable, model folder, output folder); the message says what to change."""


# The project's own files: an output folder here would overwrite them (``PHI3_LAB_OUTPUTS=..`` from notebooks/
# made ``make run`` write its executed copies over the stored chapters).
PROJECT_FOLDERS = ("notebooks", "utils", "scripts", "tests", "data", "models", "docs", "bench", "configs", ".git",
                   ".ci")


def outputs_dir() -> Path:
    """The folder that receives everything the series writes (writers create the sub-folders they need).

    ``PHI3_LAB_OUTPUTS`` unset or blank: ``<project>/outputs``. ``~`` is expanded, and a relative value is taken from
    the project folder (not from wherever a notebook's kernel or a script happens to run), so every chapter and
    script agrees on one folder. :class:`SettingsError` when the value would put outputs on the project's own files.
    """
    raw = os.environ.get("PHI3_LAB_OUTPUTS", "").strip()
    if not raw:
        return PROJECT_ROOT / "outputs"
    fix = "set PHI3_LAB_OUTPUTS to a folder of its own, e.g. PHI3_LAB_OUTPUTS=~/phi3-lab-outputs, or unset it"
    try:
        path = Path(raw).expanduser()
    except RuntimeError:  # ~user of an unknown user, or no home folder
        raise SettingsError(f"PHI3_LAB_OUTPUTS={raw}: its ~ cannot be expanded here; {fix}") from None
    if not path.is_absolute():
        path = (PROJECT_ROOT / path).resolve()
        if not path.is_relative_to(PROJECT_ROOT):  # meant from notebooks/ perhaps; either way ambiguous
            raise SettingsError(f"PHI3_LAB_OUTPUTS={raw}: a relative value is taken from the project folder, and "
                                f"this one leads out of it ({path}); give an absolute path, e.g. PHI3_LAB_OUTPUTS=~/phi3-lab-outputs")
    path = path.resolve()
    if path == PROJECT_ROOT or any(path.is_relative_to(PROJECT_ROOT / name) for name in PROJECT_FOLDERS):
        where = "the project folder itself" if path == PROJECT_ROOT else \
            f"inside the project's {path.relative_to(PROJECT_ROOT).parts[0]}/"
        raise SettingsError(f"PHI3_LAB_OUTPUTS={raw}: is {where} ({path}), so the series would write over the "
                            f"project's own files; {fix}")
    return path


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
    """A short name for the configured model, used in plot titles and reports (says so when the run is short)."""
    tag = "miniature Phi-3" if is_miniature() else model_id()
    return f"{tag} (short run)" if is_short_run() else tag


# Bounds on the numeric settings (and on scripts/finetune.py's --max-steps): beyond them a value is a typo, not a
# plan. 100,000 optimizer steps is days of training for Phi-3 Mini on one GPU; more only decays the learning
# rate towards zero for ever.
MAX_STEPS_LIMIT = 100_000
HELDOUT_LIMIT = 1_000_000
_LIMITS = {"PHI3_LAB_MAX_STEPS": MAX_STEPS_LIMIT, "PHI3_LAB_HELDOUT": HELDOUT_LIMIT}


def _positive_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    limit = _LIMITS.get(name, HELDOUT_LIMIT)
    # ASCII digits only: str.isdigit() also accepts "²" or "١٢", which int() then rejects or reads unexpectedly.
    if not re.fullmatch(r"[0-9]{1,20}", value) or not 1 <= int(value) <= limit:
        raise SettingsError(f"{name}={value}: must be a whole number from 1 to {limit:,} written in ASCII digits, "
                            f"e.g. {name}=2, or unset")
    return int(value)


def max_steps() -> int | None:
    """``PHI3_LAB_MAX_STEPS``: the most optimizer steps any training run of the series takes (None: no cap)."""
    return _positive_int("PHI3_LAB_MAX_STEPS")


def capped_steps(steps: int) -> int:
    """``steps``, or fewer when ``PHI3_LAB_MAX_STEPS`` asks for a short run."""
    cap = max_steps()
    return min(steps, cap) if cap else steps


def heldout_limit() -> int | None:
    """``PHI3_LAB_HELDOUT``: how many held-out conversations the chapters evaluate on (None: all of them)."""
    return _positive_int("PHI3_LAB_HELDOUT")


def is_short_run() -> bool:
    """True when ``PHI3_LAB_MAX_STEPS`` or ``PHI3_LAB_HELDOUT`` shortens the run (its numbers are no results)."""
    return max_steps() is not None or heldout_limit() is not None


def silence_library_noise() -> None:
    """Keep notebook outputs readable: no per-file progress bars, deprecation chatter or optional-kernel notes.

    Training progress (the trainer's own bar or table) and real errors still show; a Ctrl-C prints one line
    (:func:`quiet_interrupts`).
    """
    import logging
    import warnings

    apply_offline_switches()
    quiet_interrupts()
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
    # TrainingArguments turns the trainer's own progress display off when transformers logs above WARNING, and
    # prints a dict per logging step instead; keep that one logger at WARNING so training shows its progress table.
    logging.getLogger("transformers.training_args").setLevel(logging.WARNING)


# Offline by default, no telemetry: the miniature needs no network at all, and no run reports usage anywhere
# unless the user opts in by setting these variables themselves.
OFFLINE_SWITCHES: dict[str, str] = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
NO_TELEMETRY_SWITCHES: dict[str, str] = {
    # huggingface_hub's send_telemetry; TRL 1.16 has no switch of its own: every trainer it builds (SFTTrainer
    # included) reports its usage through send_telemetry, which this variable (or HF_HUB_OFFLINE) turns off.
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",  # the cross-tool convention (https://donottrack.sh); huggingface_hub honours it too
    "HF_UPDATE_DOWNLOAD_COUNTS": "false",  # datasets' download counter for packaged builders such as "json"
}


def apply_offline_switches() -> dict[str, str]:
    """Set the libraries' no-telemetry switches, and their offline switches for the miniature, unless already set.

    Uses ``os.environ.setdefault``, so a user's own value wins. Libraries already imported read some of these at
    import time, so their module-level copies are updated too. Returns the variables this call set.
    """
    wanted = {**NO_TELEMETRY_SWITCHES, **(OFFLINE_SWITCHES if is_miniature() else {})}
    changed = {k: v for k, v in wanted.items() if k not in os.environ}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    _keep_datasets_cache_in_outputs()
    _sync_imported_libraries()
    return changed


_own_datasets_cache: list[str] = []


def datasets_cache_dir() -> Path:
    """Where ``datasets`` caches what ``load_dataset`` builds (chapter 01): ``OUTPUTS/cache/datasets``, so that the
    series writes nothing under the home folder and ``make clean`` removes it with the rest."""
    return outputs_dir() / "cache" / "datasets"


def _keep_datasets_cache_in_outputs() -> None:
    """Point ``HF_DATASETS_CACHE`` at :func:`datasets_cache_dir` unless the user chose a cache (``HF_DATASETS_CACHE``
    or ``HF_HOME``); follows a changed output folder on the next call."""
    current = os.environ.get("HF_DATASETS_CACHE")
    if "HF_HOME" in os.environ or (current is not None and current not in _own_datasets_cache):
        return
    try:
        path = str(datasets_cache_dir())
    except SettingsError:  # reported where the output folder is used; importing the config never fails
        return
    os.environ["HF_DATASETS_CACHE"] = path
    _own_datasets_cache.append(path)
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_DATASETS_CACHE = Path(path)
        ds.DOWNLOADED_DATASETS_PATH = Path(path) / ds.DOWNLOADED_DATASETS_DIR
        ds.EXTRACTED_DATASETS_PATH = Path(path) / ds.DOWNLOADED_DATASETS_DIR / ds.EXTRACTED_DATASETS_DIR


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _sync_imported_libraries() -> None:
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE or _truthy("HF_HUB_OFFLINE")
        hub.HF_HUB_DISABLE_TELEMETRY = hub.HF_HUB_DISABLE_TELEMETRY or _truthy("HF_HUB_DISABLE_TELEMETRY") \
            or _truthy("DO_NOT_TRACK")
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_HUB_OFFLINE = ds.HF_HUB_OFFLINE or _truthy("HF_DATASETS_OFFLINE") or _truthy("HF_HUB_OFFLINE")
        ds.HF_UPDATE_DOWNLOAD_COUNTS = ds.HF_UPDATE_DOWNLOAD_COUNTS and os.environ.get(
            "HF_UPDATE_DOWNLOAD_COUNTS", "").strip().lower() not in ("0", "false", "no", "off")


def looks_like_path(spec: str) -> bool:
    """True when a model setting is meant as a folder (``./x``, ``/x``, ``~/x``, ``a/b/c``, an existing path),
    False for a hub id like ``microsoft/Phi-3-mini-4k-instruct``."""
    if spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists():
        return True
    return spec.count("/") > 1 or os.sep in spec.replace("/", "")


def check_outputs_dir() -> Path:
    """The output folder, created if needed; :class:`SettingsError` when it is a file or cannot be written."""
    out = outputs_dir()
    source = "PHI3_LAB_OUTPUTS" if "PHI3_LAB_OUTPUTS" in os.environ else "the default output folder"
    if out.exists() and not out.is_dir():
        raise SettingsError(f"{out}: is a file, not a folder ({source}); set PHI3_LAB_OUTPUTS to a folder, "
                            "e.g. PHI3_LAB_OUTPUTS=outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise SettingsError(f"{out}: cannot write there ({err.strerror or err}; {source}); set PHI3_LAB_OUTPUTS to "
                            "a folder you can write to") from None
    return out


def check_model_setting() -> str:
    """The configured model, checked without loading it; :class:`SettingsError` saying what to change when it is
    a missing or empty folder, a folder without ``config.json``, or (offline) a hub id that is not in the cache."""
    return check_model_spec(model_id())


def check_model_spec(spec: str, source: str = "PHI3_MODEL_ID") -> str:
    """:func:`check_model_setting` for any model value; ``source`` names the setting in the message."""
    if spec == MINIATURE:
        return spec
    if looks_like_path(spec):
        folder = Path(spec).expanduser()
        hint = (f"set {source} to a folder holding a Phi-3 checkpoint (config.json, *.safetensors, tokenizer), "
                f"to a hub id such as {REAL_PHI3}, or unset it for the miniature")
        if not folder.exists():
            raise SettingsError(f"{source}={spec}: no such folder; {hint}")
        if not folder.is_dir():
            raise SettingsError(f"{source}={spec}: is a file, not a model folder; {hint}")
        if not any(folder.iterdir()):
            raise SettingsError(f"{source}={spec}: the folder is empty; {hint}")
        if not (folder / "config.json").is_file():
            raise SettingsError(f"{source}={spec}: no config.json in the folder, so it is not a saved model; "
                                f"{hint}")
        return spec
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise SettingsError(f"{source}={spec}: neither a folder here nor a valid hub id (owner/name, "
                            f"e.g. {REAL_PHI3})") from None
    if "/" not in spec:
        # Every Phi-3 checkpoint has an owner (microsoft/...); a bare name is a typo, not a download to retry for a
        # minute against the network.
        close = difflib.get_close_matches(spec.lower(), [MINIATURE], n=1, cutoff=0.6)
        hint = f' (did you mean "{MINIATURE}"?)' if close else ""
        raise SettingsError(f"{source}={spec}: not a folder here, nor a hub id of the form owner/name{hint}; set it "
                            f"to {MINIATURE}, a folder holding a Phi-3 checkpoint, or a hub id such as {REAL_PHI3}")
    near = _near_known_id(spec)
    if near and not _in_hub_cache(spec):
        raise SettingsError(f'{source}={spec}: not in the local Hugging Face cache, and one letter or two away from '
                            f'{near} (did you mean "{near}"?); fix the spelling')
    if _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        if not _in_hub_cache(spec):
            raise SettingsError(f"{source}={spec}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1 "
                                f"forbids downloading it; check the spelling (e.g. {REAL_PHI3}), or download it "
                                "once with network access (unset HF_HUB_OFFLINE)")
    return spec


# Phi-3 checkpoints a typo is checked against (only for "did you mean"; any other hub id is accepted as given).
KNOWN_PHI3 = (REAL_PHI3, "microsoft/Phi-3-mini-128k-instruct", "microsoft/Phi-3.5-mini-instruct",
              "microsoft/Phi-3-medium-4k-instruct", "microsoft/Phi-3-medium-128k-instruct")


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _near_known_id(spec: str) -> str | None:
    """The known Phi-3 id ``spec`` misspells (one or two edits away, not equal), or None."""
    if spec in KNOWN_PHI3:
        return None
    near = [k for k in KNOWN_PHI3 if _edit_distance(spec.lower(), k.lower()) <= 2]
    return near[0] if near else None


def _in_hub_cache(spec: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(spec, "config.json"), str)


def check_settings() -> None:
    """Check ``PHI3_MODEL_ID``, ``PHI3_LAB_OUTPUTS`` and the short-run settings; one :class:`SettingsError` saying
    what to change."""
    check_model_setting()
    check_outputs_dir()
    max_steps()
    heldout_limit()


INTERRUPT_MESSAGE = "Interrupted. Re-run this cell to start it again; checkpoints under outputs/runs/ are kept."


def quiet_interrupts(message: str = INTERRUPT_MESSAGE) -> bool:
    """In IPython/Jupyter, make Ctrl-C print one line instead of chained tracebacks, and a wrong setting
    (:class:`SettingsError`, e.g. a bad ``PHI3_MODEL_ID`` or an adapter on the wrong base), a full disk or a folder
    another run is writing (``utils.atomic.DiskFull``, ``FolderBusy``) their one plain message.

    Returns True when a handler was registered, False outside IPython (where it does nothing).
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False

    def one_line(shell: object, etype: type, value: BaseException, tb: object, tb_offset: int | None = None) -> None:
        print(message if isinstance(value, KeyboardInterrupt) else f"{etype.__name__}: {value}")

    from utils.atomic import DiskFull, FolderBusy

    shell.set_custom_exc((KeyboardInterrupt, SettingsError, DiskFull, FolderBusy), one_line)
    return True


@contextmanager
def scratch_dir(name: str) -> Iterator[Path]:
    """A temporary folder ``OUTPUTS/tmp/NAME`` (emptied first) that is removed when the block ends.

    Use instead of ``tempfile.mkdtemp()``: nothing the series writes lands outside the output folder, and a
    folder a crash leaves behind is found, and emptied, by the next run.
    """
    root = check_outputs_dir() / "tmp"
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        try:
            root.rmdir()
        except OSError:
            pass


apply_offline_switches()
