"""Chapter 08's bookkeeping: describe a fine-tuning run, measure what it learned and what it forgot, cache it, plot it.

The chapter writes the training itself (``LoraConfig`` with its variant flags, peft's LoRA+ optimizer helper,
``SFTConfig``, ``SFTTrainer``) in its cells, as a ``make_trainer(run, model, tokenizer, train_rows, output_dir)``
function; :func:`run_experiment` calls it on a fresh copy of the base and does the rest: time the training, count
trainable parameters, weigh the saved adapter, score the new task and the base's held-out general skills, and
cache the measurements so that an interrupted grid resumes where it stopped.

- ``PHI3_LAB_EXPERIMENTS``: ``reduced`` (default: two runs, about a minute on 2 CPU cores) or ``full`` (the
  whole grid, ``make experiments``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from utils import config
from utils.atomic import atomic_write_json

MODES = ("reduced", "full")
ATTENTION = ("qkv_proj", "o_proj")
MLP = ("gate_up_proj", "down_proj")
ALL_LINEAR = "all-linear"
TARGET_NAMES = {ATTENTION: "attention", MLP: "MLP", ALL_LINEAR: "all linear"}


def experiments_mode() -> str:
    """``reduced`` (default) or ``full``, from ``PHI3_LAB_EXPERIMENTS``; anything else is an error a learner can fix."""
    mode = os.environ.get("PHI3_LAB_EXPERIMENTS", "reduced").strip().lower() or "reduced"
    if mode not in MODES:
        raise ValueError(f'PHI3_LAB_EXPERIMENTS={mode!r}: expected one of {", ".join(MODES)}')
    return mode


def experiments_dir() -> Path:
    """Where chapter 08 writes its cached runs, ``results.json`` and scratch adapters."""
    return config.outputs_dir() / "experiments"


def rate(learning_rate: float) -> str:
    """A learning rate as a short label: ``2.5e-4``, ``8.0e-3``."""
    return f"{learning_rate:.1e}".replace("e-0", "e-").replace("e+0", "e")


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the grid: method, rank, target layers, learning rate, variant flags and budget.

    ``method`` is ``lora`` (with the variant flags) or ``full`` (every parameter; rank, targets and flags unused).
    ``init`` is peft's ``init_lora_weights``: ``True`` (A random, B zero), ``"pissa"`` or ``"olora"``.
    ``loraplus_ratio`` set means LoRA+ (B learns that many times faster than A).
    """

    method: str = "lora"
    rank: int = 16
    targets: tuple[str, ...] | str = ALL_LINEAR
    learning_rate: float = 8e-3
    use_dora: bool = False
    use_rslora: bool = False
    init: bool | str = True
    loraplus_ratio: float | None = None
    epochs: float = 4.0
    batch_size: int = 8
    seed: int = 42

    def __post_init__(self) -> None:
        if self.method not in ("lora", "full"):
            raise ValueError(f'Run.method must be "lora" or "full", got {self.method!r}')
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def variant(self) -> str:
        """The method's short name: ``full FT``, ``LoRA``, ``DoRA``, ``rsLoRA``, ``PiSSA``, ``OLoRA``, ``LoRA+``."""
        if self.method == "full":
            return "full FT"
        inits = {"pissa": "PiSSA", "olora": "OLoRA"}
        names = [n for flag, n in ((self.use_dora, "DoRA"), (self.use_rslora, "rsLoRA"),
                                   (self.init in inits, inits.get(str(self.init), "")),
                                   (self.loraplus_ratio is not None, "LoRA+")) if flag]
        return "+".join(names) or "LoRA"

    @property
    def name(self) -> str:
        """A readable, unique, file-name-safe label, e.g. ``DoRA r16 all-linear lr 8.0e-3 4ep``."""
        if self.method == "full":
            core = "full FT"
        else:
            core = f"{self.variant} r{self.rank} {TARGET_NAMES.get(self.targets, '+'.join(self.targets)).replace(' ', '-')}"
        return f"{core} lr {rate(self.learning_rate)} {self.epochs:g}ep"

    def as_dict(self) -> dict[str, Any]:
        """The run's settings as JSON-ready values (targets as a list or ``all-linear``)."""
        d = asdict(self)
        d["targets"] = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        return d


@dataclass
class ExperimentData:
    """The fixed material every run shares: tokenizer, training rows, validation and test conversations of the new
    task, and the base's held-out general-skills conversations (the forgetting probe)."""

    model_path: str
    tokenizer: Any
    train_rows: list[dict]
    validation: list[list[dict]]
    test: list[list[dict]]
    skills: list[list[dict]]
    skill_names: list[str] = field(default_factory=list)


def heldout_skills(n: int | None = None) -> tuple[list[list[dict]], list[str]]:
    """The shipped base's held-out pre-training questions (the build's own test split) and their skill names."""
    from utils.miniature import MiniatureSpec
    from utils.skills import train_test_corpus

    spec = MiniatureSpec()
    _, test = train_test_corpus(spec.pretrain_examples, spec.heldout_examples, seed=spec.seed)
    test = test[:n] if n else test
    return [r["messages"] for r in test], [r["skill"] for r in test]


def split_validation(train_rows: list[dict], n_validation: int) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows): the last ``n_validation`` training rows choose learning rates, so the test
    split is never used to pick a setting."""
    if not 0 < n_validation < len(train_rows):
        raise ValueError(f"n_validation must lie between 1 and {len(train_rows) - 1}, got {n_validation}")
    return train_rows[:-n_validation], train_rows[-n_validation:]


def measure(model: Any, tokenizer: Any, data: ExperimentData, validation: bool = True) -> dict[str, float]:
    """New-task exact match and loss (test, and validation), general-skills exact match and loss, of one model.

    Skills are answered in the base's pre-training format with 16 new tokens at most, as the build measured them.
    """
    from utils.metrics import assistant_loss, evaluate_generation

    task, _ = evaluate_generation(model, tokenizer, data.test)
    skills, _ = evaluate_generation(model, tokenizer, data.skills, max_new_tokens=16)
    scores = {"task_exact_match": task["exact_match"], "task_loss": assistant_loss(model, tokenizer, data.test),
              "skills_exact_match": skills["exact_match"],
              "skills_loss": assistant_loss(model, tokenizer, data.skills)}
    if validation:
        val, _ = evaluate_generation(model, tokenizer, data.validation)
        scores |= {"validation_exact_match": val["exact_match"],
                   "validation_loss": assistant_loss(model, tokenizer, data.validation)}
    return scores


def measure_base(data: ExperimentData, cache_dir: Path | None = None,
                 load_model: Callable[[], Any] | None = None) -> dict[str, float]:
    """:func:`measure` of the untrained base, cached in ``base.json`` next to the runs (same base and data sizes)."""
    path = (cache_dir or experiments_dir()) / "base.json"
    record = read_cache_file(path)
    if record is not None and record.get("data") == _data_key(data) and isinstance(record.get("scores"), dict):
        return record["scores"]
    if load_model is None:
        from utils.models import load_model as load_configured

        model = load_configured(data.model_path)
    else:
        model = load_model()
    scores = measure(model, data.tokenizer, data)
    atomic_write_json(path, {"data": _data_key(data), "scores": scores})
    return scores


def read_cache_file(path: Path) -> dict[str, Any] | None:
    """A cached JSON record, or None when there is none; one that cannot be read (cut short by a crash or a full
    disk before writes went through :func:`~utils.atomic.atomic_write`) is named in a warning, moved aside as
    ``NAME.unreadable`` and treated as missing, so the run is measured again instead of every rerun failing."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except (OSError, ValueError) as err:
        aside = path.with_name(path.name + ".unreadable")
        path.replace(aside)
        warnings.warn(f"{path}: unreadable cache file ({str(err).splitlines()[0][:80]}); moved to {aside.name} and "
                      "measured again", stacklevel=2)
        return None


def forgetting(base: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """How much of the base's general skills a run lost: exact-match drop and loss rise (0 = nothing forgotten)."""
    return {"forgetting_exact_match": base["skills_exact_match"] - after["skills_exact_match"],
            "forgetting_loss": after["skills_loss"] - base["skills_loss"]}


def files_bytes(folder: Path) -> int:
    """Bytes of the weight files (``*.safetensors``) a ``save_model`` wrote: the adapter, or the whole model."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))


def _cache_path(run: Run, cache_dir: Path) -> Path:
    return cache_dir / "runs" / f"{run.name.replace(' ', '_').replace('+', 'plus')}.json"


def load_cached(run: Run, cache_dir: Path, data: ExperimentData) -> dict[str, Any] | None:
    """A finished run's record when one was cached with the same settings, base and data sizes; else ``None``."""
    record = read_cache_file(_cache_path(run, cache_dir))
    if record is None:
        return None
    same = record.get("run") == run.as_dict() and record.get("data") == _data_key(data)
    return record if same else None


def _data_key(data: ExperimentData) -> dict[str, Any]:
    model = Path(data.model_path)
    shown = str(model.relative_to(config.PROJECT_ROOT)) if model.is_relative_to(config.PROJECT_ROOT) else data.model_path
    from utils.adapters import base_fingerprint

    # The weights' fingerprint, not only the path: after a rebuild of the base, cached runs must not be reused.
    return {"model": shown, "base_fingerprint": base_fingerprint(data.model_path), "n_train": len(data.train_rows),
            "n_validation": len(data.validation), "n_test": len(data.test), "n_skills": len(data.skills),
            **({"max_steps": config.max_steps()} if config.max_steps() else {})}  # a short run is cached apart


TrainerFactory = Callable[[Run, Any, Any, list[dict], Path], Any]


def run_experiment(run: Run, make_trainer: TrainerFactory, data: ExperimentData, base: dict[str, float],
                   cache_dir: Path | None = None, load_model: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Train ``run`` on a fresh copy of the base with ``make_trainer`` and return (and cache) its measurements.

    ``make_trainer(run, model, tokenizer, train_rows, output_dir)`` returns an un-started trainer; ``base`` is
    :func:`measure` of the untrained base. A cached record with the same settings is returned without training.
    """
    cache_dir = cache_dir or experiments_dir()
    cached = load_cached(run, cache_dir, data)
    if cached is not None:
        return {**cached, "cached": True}
    if load_model is None:
        from utils.models import load_model as load_configured

        model = load_configured(data.model_path, training=True)
    else:
        model = load_model()
    scratch = cache_dir / "scratch" / _cache_path(run, cache_dir).stem
    shutil.rmtree(scratch, ignore_errors=True)
    trainer = make_trainer(run, model, data.tokenizer, data.train_rows, scratch / "trainer")
    from transformers import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):  # a grid prints one line per run, not a bar or a log per run
        trainer.remove_callback(quiet)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    from utils.training import count_parameters

    trainable, total = count_parameters(trainer.model)
    trainer.save_model(str(scratch / "saved"))
    size = files_bytes(scratch / "saved")
    scores = measure(trainer.model, data.tokenizer, data)
    record = {"name": run.name, "variant": run.variant, "run": run.as_dict(), "data": _data_key(data),
              **scores, **forgetting(base, scores), "trainable_parameters": trainable, "total_parameters": total,
              "saved_bytes": size, "train_seconds": round(wall, 1), "steps": trainer.state.global_step,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    shutil.rmtree(scratch, ignore_errors=True)
    atomic_write_json(_cache_path(run, cache_dir), record)
    return {**record, "cached": False}


def best_run(records: Sequence[dict[str, Any]], variant: str) -> dict[str, Any]:
    """The record of ``variant`` with the highest validation exact match (lower validation loss breaks ties)."""
    mine = [r for r in records if r["variant"] == variant]
    if not mine:
        raise ValueError(f"no run of variant {variant!r} among {sorted({r['variant'] for r in records})}")
    return max(mine, key=lambda r: (r["validation_exact_match"], -r["validation_loss"]))


def sweep(run: Run, rates: Sequence[float]) -> list[Run]:
    """The same run at each learning rate."""
    return [replace(run, learning_rate=lr) for lr in rates]


# Each method's own learning-rate sweep, three rates a factor of 4 apart. LoRA's middle rate is chapter 03's 8e-3;
# rsLoRA scales the update by alpha/sqrt(r) instead of alpha/r (4x larger at r=16), PiSSA starts from the weights'
# principal directions and LoRA+ moves B 16x faster, so their sweeps sit lower; full fine-tuning's lower still
# (TRL's "LoRA Without Regret": LoRA's best rate is about 10x full fine-tuning's).
VARIANTS: dict[str, tuple[Run, tuple[float, ...]]] = {
    "LoRA": (Run(), (2e-3, 8e-3, 3.2e-2)),
    "DoRA": (Run(use_dora=True), (2e-3, 8e-3, 3.2e-2)),
    "rsLoRA": (Run(use_rslora=True), (5e-4, 2e-3, 8e-3)),
    "PiSSA": (Run(init="pissa"), (5e-4, 2e-3, 8e-3)),
    "LoRA+": (Run(loraplus_ratio=16.0), (5e-4, 2e-3, 8e-3)),
    "full FT": (Run(method="full"), (2.5e-4, 1e-3, 4e-3)),
}
RANKS = (1, 4, 16, 64)
TARGETS = (ATTENTION, MLP, ALL_LINEAR)


def reduced_grid(epochs: float = 4.0) -> list[Run]:
    """The default, CI-sized grid: LoRA at chapter 03's settings and full fine-tuning at its middle rate."""
    return [replace(VARIANTS["LoRA"][0], epochs=epochs), replace(VARIANTS["full FT"][0], learning_rate=1e-3,
                                                                  epochs=epochs)]


def sweep_grid(epochs: float = 4.0) -> list[Run]:
    """Stage 1 of the full grid: every variant at each of its own learning rates."""
    return [r for run, rates in VARIANTS.values() for r in sweep(replace(run, epochs=epochs), rates)]


def shape_grid(lora_learning_rate: float, epochs: float = 4.0) -> list[Run]:
    """Stage 2: LoRA's rank sweep (all linear layers) and target sets (rank 16), at LoRA's best learning rate."""
    base = Run(learning_rate=lora_learning_rate, epochs=epochs)
    return list(dict.fromkeys([replace(base, rank=r) for r in RANKS] + [replace(base, targets=t) for t in TARGETS]))


def results_table(records: Sequence[dict[str, Any]]) -> Any:
    """One row per run (pandas): settings, new-task scores, forgetting, cost."""
    import pandas as pd

    rows = [{"run": r["name"], "variant": r["variant"], "lr": r["run"]["learning_rate"],
             "task EM": r["task_exact_match"], "task loss": r["task_loss"],
             "skills EM": r["skills_exact_match"], "forgot EM": r["forgetting_exact_match"],
             "skills loss +": r["forgetting_loss"], "trainable": r["trainable_parameters"],
             "saved KiB": r["saved_bytes"] / 1024, "train s": r["train_seconds"]} for r in records]
    return pd.DataFrame(rows).set_index("run")


def write_results(path: Path, records: Sequence[dict[str, Any]], base: dict[str, float],
                  settings: dict[str, Any]) -> dict[str, Any]:
    """Write ``{"command", "settings", "date", "base", "runs"}`` as JSON (atomically); returns what was written."""
    problems = check_records(records)
    if problems:
        raise ValueError("results not written:\n" + "\n".join(problems))
    results = {"settings": settings, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "base": base, "runs": [{k: v for k, v in r.items() if k != "cached"} for r in records]}
    atomic_write_json(path, results)
    return results


RATES = ("task_exact_match", "skills_exact_match", "validation_exact_match")
NUMBERS = RATES + ("task_loss", "skills_loss", "validation_loss", "forgetting_exact_match", "forgetting_loss")


def check_records(records: Sequence[dict[str, Any]]) -> list[str]:
    """What is wrong with a list of run records (empty when each has finite scores, rates in [0, 1], counts > 0)."""
    problems: list[str] = []
    for r in records:
        name = r.get("name", "?")
        for key in NUMBERS:
            value = r.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                problems.append(f'{name}: "{key}" must be a finite number, got {value!r}')
            elif key in RATES and not 0.0 <= value <= 1.0:
                problems.append(f'{name}: "{key}" is a rate and must lie in [0, 1], got {value}')
        for key in ("trainable_parameters", "saved_bytes"):
            if not isinstance(r.get(key), int) or r[key] <= 0:
                problems.append(f'{name}: "{key}" must be a positive integer, got {r.get(key)!r}')
    return problems


def pareto_front(records: Sequence[dict[str, Any]]) -> list[str]:
    """Names of the runs no other run beats on both axes (higher task exact match and less forgetting)."""
    def dominated(r: dict[str, Any]) -> bool:
        return any(o["task_exact_match"] >= r["task_exact_match"]
                   and o["forgetting_exact_match"] <= r["forgetting_exact_match"]
                   and (o["task_exact_match"], -o["forgetting_exact_match"])
                   != (r["task_exact_match"], -r["forgetting_exact_match"]) for o in records)

    return [r["name"] for r in records if not dominated(r)]


COLORS = {"LoRA": "#4c72b0", "DoRA": "#55a868", "rsLoRA": "#8172b2", "PiSSA": "#ccb974", "OLoRA": "#ccb974",
          "LoRA+": "#64b5cd", "full FT": "#c44e52"}


def _scatter(records: Sequence[dict[str, Any]], x_key: str, xlabel: str, title: str, log_x: bool = False) -> Any:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for variant in dict.fromkeys(r["variant"] for r in records):
        mine = [r for r in records if r["variant"] == variant]
        ax.scatter([r[x_key] for r in mine], [r["task_exact_match"] for r in mine], s=36,
                   color=COLORS.get(variant, "#777"), label=variant, alpha=0.85, edgecolor="white")
    ax.set(xlabel=xlabel, ylabel="new task: exact match (test)", title=title, ylim=(-0.03, 1.03))
    if log_x:
        ax.set_xscale("log")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: points fill every corner
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def learn_vs_forget(records: Sequence[dict[str, Any]], title: str = "learning vs forgetting") -> Any:
    """New-task exact match against forgetting (drop in held-out general-skills exact match), one point per run."""
    fig = _scatter(records, "forgetting_exact_match", "forgetting: drop in the base's held-out skills (exact match)",
                   title)
    fig.axes[0].axvline(0, color="#999", lw=0.8)
    return fig


def score_vs_parameters(records: Sequence[dict[str, Any]], title: str = "score vs trainable parameters") -> Any:
    """New-task exact match against trainable parameters (log scale), one point per run."""
    return _scatter(records, "trainable_parameters", "trainable parameters (log scale)", title, log_x=True)


def check_lora_config(lora_config: Any, rank: int, targets: Sequence[str], use_dora: bool) -> str:
    """Exercise check: does a ``LoraConfig`` have this rank, exactly these target modules and this DoRA flag?"""
    problems = []
    if lora_config.r != rank:
        problems.append(f"r is {lora_config.r}, wanted {rank}")
    if set(lora_config.target_modules or ()) != set(targets):
        problems.append(f"target_modules is {sorted(lora_config.target_modules or ())}, wanted {sorted(targets)}")
    if bool(lora_config.use_dora) != use_dora:
        problems.append(f"use_dora is {lora_config.use_dora}, wanted {use_dora}")
    return "correct" if not problems else "not yet: " + "; ".join(problems)


def check_pareto(answer: Sequence[str], records: Sequence[dict[str, Any]]) -> str:
    """Exercise check: is ``answer`` exactly the set of runs no other run beats on both axes?"""
    want = set(pareto_front(records))
    got = set(answer)
    if got == want:
        return "correct"
    return (f"not yet: missing {sorted(want - got)}" if want - got else "not yet") + (
        f"; not on the front: {sorted(got - want)}" if got - want else "")


def check_forgetting(answer: float, base: dict[str, float], record: dict[str, Any]) -> str:
    """Exercise check: the drop in held-out general-skills exact match from the base to one run."""
    want = base["skills_exact_match"] - record["skills_exact_match"]
    return "correct" if abs(answer - want) < 1e-9 else f"not yet: the base scored {base['skills_exact_match']:.3f}"
