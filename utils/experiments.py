"""Chapter 08's bookkeeping: describe a fine-tuning run, measure what it learned and what it forgot, cache it, plot it.

The chapter writes the training itself (``LoraConfig`` with its variant flags, peft's LoRA+ optimizer helper,
``SFTConfig``, ``SFTTrainer``) in its cells, as a ``make_trainer(run, model, tokenizer, train_rows, output_dir)``
function; :func:`run_experiment` calls it on a fresh copy of the base and does the rest: time the training, count
trainable parameters, weigh the saved adapter, score the new task and the base's held-out general skills, and
cache the measurements so that an interrupted grid resumes where it stopped.

- ``PHI3_LAB_EXPERIMENTS``: ``reduced`` (default: four short runs, one seed) or ``full`` (the whole grid,
  three seeds for the methods the conclusions rest on, ``make experiments``). On a model other than the miniature
  (``PHI3_MODEL_ID``) the full grid is :func:`t4_grid`, sized for a free Colab T4.

Forgetting is compared the way Biderman et al. (2024, "LoRA Learns Less and Forgets Less") compare it: each method's
learning-rate sweep traces a curve of forgetting against learning, and :func:`equal_learning` reads every curve at
the same task score. :func:`findings` turns the runs into the verdicts the chapter prints.
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
        init = "pissa" if str(self.init).startswith("pissa") else str(self.init)  # pissa_niter_4: the fast SVD
        inits = {"pissa": "PiSSA", "olora": "OLoRA"}
        names = [n for flag, n in ((self.use_dora, "DoRA"), (self.use_rslora, "rsLoRA"),
                                   (init in inits, inits.get(init, "")),
                                   (self.loraplus_ratio is not None, "LoRA+")) if flag]
        return "+".join(names) or "LoRA"

    @property
    def label(self) -> str:
        """The method with its shape where it differs from rank 16 on all linear layers: ``LoRA``, ``LoRA r4``,
        ``LoRA MLP``, ``full FT``. Runs of one label at several rates and seeds form one sweep."""
        if self.method == "full":
            return "full FT"
        shape = ([f"r{self.rank}"] if self.rank != 16 else []) + (
            [TARGET_NAMES.get(self.targets, "+".join(self.targets))] if self.targets != ALL_LINEAR else [])
        return " ".join([self.variant, *shape])

    @property
    def name(self) -> str:
        """A readable, unique, file-name-safe label, e.g. ``DoRA r16 all-linear lr 8.0e-3 4ep``."""
        if self.method == "full":
            core = "full FT"
        else:
            core = f"{self.variant} r{self.rank} {TARGET_NAMES.get(self.targets, '+'.join(self.targets)).replace(' ', '-')}"
        return f"{core} lr {rate(self.learning_rate)} {self.epochs:g}ep" + (f" seed {self.seed}" if self.seed != 42 else "")

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


# The skills are answered with up to 24 new tokens: the base's answers need at most 16, and a fine-tune that switches
# to the house format (``FIX | item: sink | ...``) needs the extra room to show whether the content survived.
SKILLS_MAX_NEW_TOKENS = 24
# Bumped whenever what measure() records changes, so that cached runs measured the old way are measured again.
MEASURE_VERSION = 2
# Prompts generated at once: the miniature is so small that a step costs Python's overhead, not arithmetic, so large
# batches measure a run several times faster (on a GPU, 32 keeps the real model's logits within a T4's memory).
GENERATION_BATCH = 128


def content_scores(data: ExperimentData, answers: Sequence[str]) -> list[bool]:
    """Per skills question: does the answer hold the right content in any format (:func:`utils.skills.content_match`)?"""
    from utils.skills import content_match

    return [content_match(skill, conv[0]["content"], conv[-1]["content"], answer)
            for skill, conv, answer in zip(data.skill_names, data.skills, answers)]


def measure(model: Any, tokenizer: Any, data: ExperimentData, validation: bool = True) -> dict[str, Any]:
    """New-task exact match and loss (test, and validation), general-skills exact match, content match and loss.

    The skills' answers are kept (``skills_answers``): they show what a forgotten answer became, and let the content
    check (right content in any format) be scored again without training.
    """
    from utils.metrics import assistant_loss, evaluate_generation

    import torch

    batch = GENERATION_BATCH if not torch.cuda.is_available() else 32
    task, _ = evaluate_generation(model, tokenizer, data.test, batch_size=batch)
    skills, answers = evaluate_generation(model, tokenizer, data.skills, max_new_tokens=SKILLS_MAX_NEW_TOKENS,
                                          batch_size=batch)
    texts = [a.text for a in answers]
    content = content_scores(data, texts)
    scores: dict[str, Any] = {
        "task_exact_match": task["exact_match"], "task_loss": assistant_loss(model, tokenizer, data.test),
        "skills_exact_match": skills["exact_match"], "skills_content_match": sum(content) / max(len(content), 1),
        "skills_loss": assistant_loss(model, tokenizer, data.skills)}
    if validation:
        val, _ = evaluate_generation(model, tokenizer, data.validation, batch_size=batch)
        scores |= {"validation_exact_match": val["exact_match"],
                   "validation_loss": assistant_loss(model, tokenizer, data.validation)}
    return scores | {"skills_answers": texts}


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
    """How much of the base's general skills a run lost (0 = nothing forgotten): the drop in exact match, the drop
    in content match (right content in any format: what is left once format switching is forgiven), and the rise
    in loss on the base's own answers."""
    lost = {"forgetting_exact_match": base["skills_exact_match"] - after["skills_exact_match"],
            "forgetting_loss": after["skills_loss"] - base["skills_loss"]}
    if "skills_content_match" in base and "skills_content_match" in after:
        lost["forgetting_content"] = base["skills_content_match"] - after["skills_content_match"]
    return lost


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
    return {"model": shown, "base_fingerprint": base_fingerprint(data.model_path), "measure": MEASURE_VERSION,
            "n_train": len(data.train_rows),
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
    steps = trainer.state.global_step
    del trainer, model  # one model at a time: on a GPU the next run's fresh base must not sit beside this one
    from utils.models import release_memory

    release_memory()
    record = {"name": run.name, "variant": run.variant, "label": run.label, "run": run.as_dict(),
              "data": _data_key(data),
              **scores, **forgetting(base, scores), "trainable_parameters": trainable, "total_parameters": total,
              "saved_bytes": size, "train_seconds": round(wall, 1), "steps": steps,
              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    shutil.rmtree(scratch, ignore_errors=True)
    atomic_write_json(_cache_path(run, cache_dir), record)
    return {**record, "cached": False}


def sweep(run: Run, rates: Sequence[float], seeds: Sequence[int] = (42,)) -> list[Run]:
    """The same run at each learning rate (and each seed)."""
    return [replace(run, learning_rate=lr, seed=seed) for lr in rates for seed in seeds]


SEEDS = (42, 43, 44)
# The methods the conclusions rest on, each at every rate of its own sweep with three seeds. A sweep runs from a rate
# that learns little (and forgets little) to one past the rate that learns most, so that every method's curve of
# forgetting against learning covers the task scores where the methods are compared. Rates are a factor of 4 apart.
# LoRA's middle rate is chapter 03's 8e-3. PiSSA's best rate sat at the top of an earlier four-epoch sweep ending at
# 8e-3, so its sweep reaches 3.2e-2; with one epoch it learned most at 2e-3, so it reaches down to 5e-4 too. Full
# fine-tuning's sweep sits 8x lower (TRL's "LoRA Without Regret": LoRA's best rate is about 10x full fine-tuning's)
# and reaches 1.6e-2, since with one epoch it learned most at 4e-3, the top of a sweep ending there.
CORE: dict[str, tuple[Run, tuple[float, ...]]] = {
    "LoRA": (Run(), (2e-3, 8e-3, 3.2e-2)),
    "PiSSA": (Run(init="pissa"), (5e-4, 2e-3, 8e-3, 3.2e-2)),
    "full FT": (Run(method="full"), (2.5e-4, 1e-3, 4e-3, 1.6e-2)),
}
# Ranks 4 and 64: one seed and two rates each (their curves start at the base), read against the spread of the
# three-seed sweeps above. DoRA, rsLoRA and LoRA+ are one argument each in the chapter's trainer, left to the
# exercises to keep `make experiments` within 30 minutes on 2 cores.
OTHERS: dict[str, tuple[Run, tuple[float, ...]]] = {
    "LoRA r4": (Run(rank=4), (8e-3, 3.2e-2)),
    "LoRA r64": (Run(rank=64), (2e-3, 8e-3)),
}
# The default grid (what `make test` runs, as fast as before): LoRA at chapter 03's rate and full fine-tuning at 1e-3,
# seed 42, two runs of the full grid (`make experiments` takes them from the cache). Each curve is then a straight
# line from the base to one run: enough for the direction of the equal-learning comparison, which agrees with the
# full grid's, not for its spread, the rate's effect, PiSSA or the ranks. (With full fine-tuning at 4e-3 instead,
# the straight line would reverse the comparison: one rate per method is a weak sweep.)
REDUCED: dict[str, tuple[Run, tuple[float, ...]]] = {
    "LoRA": (Run(), (8e-3,)),
    "full FT": (Run(method="full"), (1e-3,)),
}
# On the real Phi-3 Mini (PHI3_MODEL_ID), sized for a free Colab T4: LoRA and PiSSA at rank 16 in 16-bit, three rates,
# one seed (PiSSA's SVD by peft's fast "pissa_niter_4"); the reduced grid there is LoRA at its middle rate. Full
# fine-tuning of 3.8 B parameters does not fit a T4 (16-bit weights and gradients plus AdamW's fp32 moments: about
# 45 GiB).
T4: dict[str, tuple[Run, tuple[float, ...]]] = {
    "LoRA": (Run(), (5e-5, 2e-4, 8e-4)),
    "PiSSA": (Run(init="pissa_niter_4"), (5e-5, 2e-4, 8e-4)),
}
T4_REDUCED: dict[str, tuple[Run, tuple[float, ...]]] = {"LoRA": (Run(), (2e-4,))}
EPOCHS = 1.0  # every grid's budget: one epoch of the 420 training conversations (chapter 03 trains four)


def grid(mode: str, miniature: bool = True, epochs: float = EPOCHS) -> list[Run]:
    """The runs of a grid, in the order they run: ``reduced`` (default) or ``full`` (:data:`CORE` with three seeds,
    then :data:`OTHERS`); on a model other than the miniature, the T4 grids (:data:`T4`, :data:`T4_REDUCED`)."""
    if mode not in MODES:
        raise ValueError(f"grid mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not miniature:
        plan = [(T4_REDUCED if mode == "reduced" else T4, (42,))]
    elif mode == "reduced":
        plan = [(REDUCED, (42,))]
    else:
        plan = [(CORE, SEEDS), (OTHERS, (42,))]
    return [r for methods, seeds in plan for run, rates in methods.values()
            for r in sweep(replace(run, epochs=epochs), rates, seeds)]


# --- reading a grid ------------------------------------------------------------------------------------------------

def labels(records: Sequence[dict[str, Any]]) -> list[str]:
    """The methods of a grid in the order they ran (``LoRA``, ``PiSSA``, ``full FT``, ``LoRA r4``, ...)."""
    return list(dict.fromkeys(r["label"] for r in records))


def seeds_of(records: Sequence[dict[str, Any]], label: str) -> list[int]:
    """The seeds ``label`` ran with."""
    return sorted({r["run"]["seed"] for r in records if r["label"] == label})


def by_rate(records: Sequence[dict[str, Any]], label: str, key: str) -> dict[float, list[float]]:
    """``{learning rate: [value of key, one per seed]}`` for one method, rates in increasing order."""
    out: dict[float, list[float]] = {}
    for r in sorted((r for r in records if r["label"] == label), key=lambda r: (r["run"]["learning_rate"],
                                                                             r["run"]["seed"])):
        out.setdefault(r["run"]["learning_rate"], []).append(r[key])
    return out


def best_rate(records: Sequence[dict[str, Any]], label: str) -> float:
    """The rate of ``label`` with the highest validation exact match, averaged over seeds (lower mean validation
    loss breaks ties): chosen on the validation conversations, never on the test split."""
    em, loss = by_rate(records, label, "validation_exact_match"), by_rate(records, label, "validation_loss")
    if not em:
        raise ValueError(f"no run of {label!r} among {labels(records)}")
    return max(em, key=lambda lr: (sum(em[lr]) / len(em[lr]), -sum(loss[lr]) / len(loss[lr])))


def rising_curve(records: Sequence[dict[str, Any]], label: str, seed: int, base: dict[str, float],
                 forgetting_key: str = "forgetting_exact_match") -> list[tuple[float, float]]:
    """One seed's sweep as (test exact match, forgetting) points, starting at the untrained base (the limit of a
    learning rate of 0: the base's own task score, nothing forgotten) and rising with the rate up to the rate that
    learned most. Rates past it learn less and forget more, another branch; a point that learned no more than the
    one before it is skipped, so task scores strictly increase and the curve can be read at any score it spans."""
    mine = sorted((r for r in records if r["label"] == label and r["run"]["seed"] == seed),
                  key=lambda r: r["run"]["learning_rate"])
    if not mine:
        return []
    peak = max(range(len(mine)), key=lambda i: mine[i]["task_exact_match"])
    curve = [(base["task_exact_match"], 0.0)]
    for r in mine[:peak + 1]:
        if r["task_exact_match"] > curve[-1][0]:
            curve.append((r["task_exact_match"], r[forgetting_key]))
    return curve


def read_curve(curve: Sequence[tuple[float, float]], level: float) -> float | None:
    """Forgetting on a curve at task score ``level``, linearly between its points; ``None`` beyond its reach."""
    if not curve or not curve[0][0] <= level <= curve[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= level <= x1:
            return y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    return curve[-1][1]


def common_level(records: Sequence[dict[str, Any]], base: dict[str, float], methods: Sequence[str]) -> float:
    """The highest test exact match that every seed of every method in ``methods`` reached: where all of them can be
    read at equal learning."""
    return min(rising_curve(records, m, s, base)[-1][0] for m in methods for s in seeds_of(records, m))


def equal_learning(records: Sequence[dict[str, Any]], base: dict[str, float], level: float,
                   methods: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Each method's forgetting at test exact match ``level``, read off each seed's sweep: mean, min and max over
    the seeds, for exact match and for content match (format switching forgiven). ``None`` where a method's sweep
    never reached ``level``."""
    rows = []
    for m in methods or labels(records):
        row: dict[str, Any] = {"method": m, "seeds": len(seeds_of(records, m)), "level": level}
        for key, short in (("forgetting_exact_match", "exact"), ("forgetting_content", "content")):
            values = [read_curve(rising_curve(records, m, s, base, key), level) for s in seeds_of(records, m)]
            got = [v for v in values if v is not None]
            reached = len(got) == len(values) and bool(got)
            row |= {f"{short} mean": sum(got) / len(got) if reached else None,
                    f"{short} min": min(got) if reached else None, f"{short} max": max(got) if reached else None}
        rows.append(row)
    return rows


def compare(a: dict[str, Any], b: dict[str, Any], short: str = "exact") -> str:
    """Which of two :func:`equal_learning` rows forgets less, and whether the gap exceeds the seeds' spread (their
    min-max ranges do not overlap). With one seed on either side there is no spread to compare with."""
    if a[f"{short} mean"] is None or b[f"{short} mean"] is None:
        return "not comparable (a sweep did not reach the level)"
    less, more = (a, b) if a[f"{short} mean"] <= b[f"{short} mean"] else (b, a)
    if min(a["seeds"], b["seeds"]) < 2:
        return f"{less['method']} forgets less (one seed: no spread to judge by)"
    if less[f"{short} max"] < more[f"{short} min"]:
        return f"{less['method']} forgets less, beyond the seeds' spread"
    return f"within the seeds' spread ({less['method']} {less[f'{short} mean']:.2f}, {more['method']} " \
           f"{more[f'{short} mean']:.2f})"


def format_switches(records: Sequence[dict[str, Any]], base: dict[str, Any], data: ExperimentData
                    ) -> dict[str, float]:
    """Of the skills questions the base answered exactly right, the share each run got wrong (``lost``), and of
    those the share still right in content (``format switched``: the skill kept, the format changed), averaged over
    the runs given."""
    from utils.metrics import exact_match

    refs = [c[-1]["content"] for c in data.skills]
    right = [i for i, (a, ref) in enumerate(zip(base["skills_answers"], refs)) if exact_match(a, ref)]
    lost = switched = 0
    for r in records:
        content = content_scores(data, r["skills_answers"])
        gone = [i for i in right if not exact_match(r["skills_answers"][i], refs[i])]
        lost += len(gone)
        switched += sum(content[i] for i in gone)
    asked = max(len(right) * len(records), 1)
    return {"lost": lost / asked, "format switched": switched / max(lost, 1)}


def lowest_rate_forgets_least(records: Sequence[dict[str, Any]], label: str,
                              key: str = "forgetting_exact_match") -> bool:
    """Did the method's lowest learning rate forget least (mean over seeds) of all the rates of its sweep?"""
    means = [sum(v) / len(v) for v in by_rate(records, label, key).values()]
    return bool(means) and means[0] == min(means)


# What findings() says, in the order the chapter prints it. Both grids show the first four, with the same verdict
# (make test checks the default grid's against the stored full grid's); the rest need the full grid's seeds and
# methods and read "needs the full grid" in the default one.
SHARED_FINDINGS = ("less forgetting at equal learning, full FT or LoRA (exact match)",
                   "less forgetting at equal learning, full FT or LoRA (content)",
                   "forgetting that is format switching")
FULL_FINDINGS = ("lowest rate, least forgetting", "full FT vs LoRA against the seeds' spread (exact match)",
                 "full FT vs LoRA against the seeds' spread (content)",
                 "PiSSA vs LoRA at equal learning (exact match)", "PiSSA vs LoRA at equal learning (content)",
                 "best rate at a sweep's edge", "rank at equal learning")
NEEDS_FULL = "needs the full grid"


def findings(records: Sequence[dict[str, Any]], base: dict[str, Any], data: ExperimentData) -> dict[str, str]:
    """The grid's conclusions as short verdicts, computed from its runs: the sentences the chapter prints.

    Comparisons are at equal learning (:func:`equal_learning` at :func:`common_level` of the methods compared), and
    a difference counts only when it exceeds the seeds' min-max spread (:func:`compare`).
    """
    found: dict[str, str] = {}
    methods = labels(records)
    swept = [m for m in methods if len(by_rate(records, m, "task_exact_match")) > 1]
    rising = [m for m in swept if lowest_rate_forgets_least(records, m)]
    if swept:
        found["lowest rate, least forgetting"] = ("in every sweep" if len(rising) == len(swept) else
                                                   f"in {len(rising)} of {len(swept)} sweeps (not in "
                                                   f"{', '.join(m for m in swept if m not in rising)})")
    seeded = all(len(seeds_of(records, m)) > 1 for m in ("full FT", "LoRA") if m in methods)
    for short, what in (("exact", "exact match"), ("content", "content")):
        if "full FT" in methods and "LoRA" in methods:
            level = common_level(records, base, ["full FT", "LoRA"])
            rows = {r["method"]: r for r in equal_learning(records, base, level, ["full FT", "LoRA"])}
            gap = rows["full FT"][f"{short} mean"] - rows["LoRA"][f"{short} mean"]
            found[f"less forgetting at equal learning, full FT or LoRA ({what})"] = (
                "full FT" if gap < 0 else "LoRA" if gap > 0 else "neither")
            found[f"full FT vs LoRA against the seeds' spread ({what})"] = (
                compare(rows["full FT"], rows["LoRA"], short) if seeded else NEEDS_FULL)
        if "PiSSA" in methods and "LoRA" in methods:
            level = common_level(records, base, ["PiSSA", "LoRA"])
            rows = {r["method"]: r for r in equal_learning(records, base, level, ["PiSSA", "LoRA"])}
            found[f"PiSSA vs LoRA at equal learning ({what})"] = compare(rows["PiSSA"], rows["LoRA"], short)
    lora = [r for r in records if r["label"] == "LoRA"] or list(records)
    share = format_switches(lora, base, data)["format switched"]
    found["forgetting that is format switching"] = "most of it" if share > 0.5 else "some of it" if share >= 0.1 else "little of it"
    if any(len(seeds_of(records, m)) > 1 for m in methods):
        swept = [m for m in methods if len(by_rate(records, m, "task_exact_match")) >= 3]
        edge = [m for m in swept if best_rate(records, m) in (min(by_rate(records, m, "task_exact_match")),
                                                             max(by_rate(records, m, "task_exact_match")))]
        found["best rate at a sweep's edge"] = ", ".join(edge) or f"none of {len(swept)} swept methods"
        ranks = [m for m in ("LoRA r4", "LoRA", "LoRA r64") if m in methods]
        if len(ranks) > 1:
            level = common_level(records, base, ranks)
            rows = equal_learning(records, base, level, ranks)
            order = sorted((r for r in rows if r["exact mean"] is not None), key=lambda r: r["exact mean"])
            found["rank at equal learning"] = "forgot least to most: " + ", ".join(
                f"{'r16' if r['method'] == 'LoRA' else r['method'].split()[-1]} {r['exact mean']:.2f}"
                for r in order) + f" (exact match at test EM {level:.2f}; one seed for r4 and r64)"
    for key in SHARED_FINDINGS + FULL_FINDINGS:
        found.setdefault(key, NEEDS_FULL)
    return {key: found[key] for key in SHARED_FINDINGS + FULL_FINDINGS}


def forgotten_examples(record: dict[str, Any], base: dict[str, Any], data: ExperimentData, n: int = 4) -> Any:
    """A small table (pandas) of skills questions the base answered right and ``record`` did not: the question, the
    base's answer, the fine-tune's, and whether the content survived. One per skill first, so all kinds show."""
    import pandas as pd

    from utils.metrics import exact_match

    content = content_scores(data, record["skills_answers"])
    rows, seen = [], []
    gone = [i for i, conv in enumerate(data.skills) if exact_match(base["skills_answers"][i], conv[-1]["content"])
            and not exact_match(record["skills_answers"][i], conv[-1]["content"])]
    firsts = [i for i in gone if data.skill_names[i] not in seen and not seen.append(data.skill_names[i])]
    for i in (firsts + [i for i in gone if i not in firsts])[:n]:
        rows.append({"skill": data.skill_names[i], "question": data.skills[i][0]["content"],
                     "base": base["skills_answers"][i], "after fine-tuning": record["skills_answers"][i],
                     "content kept": content[i]})
    return pd.DataFrame(rows)


def results_table(records: Sequence[dict[str, Any]]) -> Any:
    """One row per run (pandas): settings, new-task scores, forgetting, cost."""
    import pandas as pd

    rows = [{"run": r["name"], "method": r["label"], "lr": r["run"]["learning_rate"], "seed": r["run"]["seed"],
             "val EM": r["validation_exact_match"], "task EM": r["task_exact_match"], "task loss": r["task_loss"],
             "skills EM": r["skills_exact_match"], "forgot EM": r["forgetting_exact_match"],
             "forgot content": r["forgetting_content"], "skills loss +": r["forgetting_loss"],
             "trainable": r["trainable_parameters"],
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


RATES = ("task_exact_match", "skills_exact_match", "skills_content_match", "validation_exact_match")
NUMBERS = RATES + ("task_loss", "skills_loss", "validation_loss", "forgetting_exact_match", "forgetting_content",
                   "forgetting_loss")


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


COLORS = {"LoRA": "#4c72b0", "DoRA": "#55a868", "rsLoRA": "#8172b2", "PiSSA": "#ccb974", "OLoRA": "#937860",
          "LoRA+": "#64b5cd", "full FT": "#c44e52", "LoRA r4": "#9fb4d8", "LoRA r64": "#1f3a68"}


def learn_vs_forget(records: Sequence[dict[str, Any]], base: dict[str, float], level: float | None = None,
                    title: str = "learning vs forgetting") -> Any:
    """Biderman et al.'s picture: forgetting against learning, one line per method through its learning rates (low
    to high), each point the mean over seeds with min-max bars; left panel exact match, right panel content match
    (format switching forgiven). A dotted line marks ``level``, where the methods are compared."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), sharey=True)
    for ax, key, what in zip(axes, ("forgetting_exact_match", "forgetting_content"),
                             ("exact match (format counts)", "content (any format)")):
        for i, m in enumerate(labels(records)):
            xs, ys = by_rate(records, m, "task_exact_match"), by_rate(records, m, key)
            mx = [sum(v) / len(v) for v in xs.values()]
            my = [sum(v) / len(v) for v in ys.values()]
            color = COLORS.get(m, f"C{i}")
            def bars(means, values):  # min-max around each mean (never below 0: a mean of equal values can round)
                return [[max(m - min(v), 0.0) for m, v in zip(means, values)],
                        [max(max(v) - m, 0.0) for m, v in zip(means, values)]]

            ax.errorbar(mx, my, xerr=bars(mx, xs.values()), yerr=bars(my, ys.values()),
                        fmt="o-", ms=4, lw=1.2, capsize=2, color=color,
                        label=f"{m} ({len(seeds_of(records, m))} seed{'s' if len(seeds_of(records, m)) > 1 else ''})")
            ax.annotate("low lr", (mx[0], my[0]), fontsize=7, color=color, xytext=(3, -9), textcoords="offset points")
        if level is not None:
            ax.axvline(level, color="#555", ls=":", lw=1)
        ax.scatter([base["task_exact_match"]], [0.0], marker="*", s=90, color="k", zorder=3,
                   label="untrained base" if key == "forgetting_exact_match" else None)
        ax.set(xlabel="learned: new task exact match (test)", title=f"forgetting, {what}", xlim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("forgot: drop in the base's held-out skills")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def equal_learning_bars(rows: Sequence[dict[str, Any]], title: str = "forgetting at equal learning") -> Any:
    """The rows of :func:`equal_learning` as bars (mean over seeds) with min-max whiskers: exact and content."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["exact mean"] is not None and r["exact mean"] == r["exact mean"]]  # reached (not NaN)
    fig, ax = plt.subplots(figsize=(6.8, 3.6))
    width = 0.38
    for j, (short, hatch) in enumerate((("exact", ""), ("content", "//"))):
        xs = [i + (j - 0.5) * width for i in range(len(rows))]
        means = [r[f"{short} mean"] for r in rows]
        err = [[max(m - r[f"{short} min"], 0.0) for m, r in zip(means, rows)],
               [max(r[f"{short} max"] - m, 0.0) for m, r in zip(means, rows)]]
        ax.bar(xs, means, width, yerr=err, capsize=3, hatch=hatch, edgecolor="white",
               color=[COLORS.get(r["method"], "#777") for r in rows], alpha=1.0 if j == 0 else 0.6,
               label="exact match" if j == 0 else "content (any format)")
    ax.set_xticks(range(len(rows)), [f"{r['method']}\n{r['seeds']} seed{'s' if r['seeds'] > 1 else ''}" for r in rows],
                  fontsize=8)
    ax.set(ylabel="forgot (drop in skills score)", title=f"{title} (test EM {rows[0]['level']:.2f})" if rows else title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


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


def check_forgetting(answer: float, base: dict[str, float], record: dict[str, Any], content: bool = False) -> str:
    """Exercise check: the drop in held-out general-skills exact match (``content=True``: content match) from the
    base to one run."""
    key = "skills_content_match" if content else "skills_exact_match"
    want = base[key] - record[key]
    return "correct" if abs(answer - want) < 1e-9 else f"not yet: the base scored {base[key]:.3f}"


def check_equal_learning(answer: float, records: Sequence[dict[str, Any]], base: dict[str, float], label: str,
                         seed: int, level: float) -> str:
    """Exercise check: one seed's forgetting (exact match) at test exact match ``level``, read off its sweep."""
    want = read_curve(rising_curve(records, label, seed, base), level)
    if want is None:
        return f"not yet: seed {seed} of {label} never reached {level}; pick a lower level"
    return "correct" if abs(answer - want) < 1e-6 else (
        f"not yet: start at the base ({base['task_exact_match']:.3f}, 0), keep the rates up to the one that learned "
        "most, and interpolate between the two points around the level")
