"""Chapter 08's bookkeeping: runs, measurements, forgetting, the cache, results.json, plots and exercise checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from utils import experiments as ex
from utils.experiments import ExperimentData, Run


def _make_trainer(run: Run, model, tokenizer, train_rows, output_dir: Path):
    """A trainer like chapter 08's, a few steps long."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from utils.training import to_dataset

    set_seed(run.seed)
    args = SFTConfig(output_dir=str(output_dir), max_steps=2, learning_rate=run.learning_rate,
                     per_device_train_batch_size=run.batch_size, weight_decay=0.0, seed=run.seed,
                     assistant_only_loss=True, padding_free=True, max_length=None, bf16=False, save_strategy="no",
                     logging_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False)
    optimizers = (None, None)
    if run.method == "lora":
        targets = run.targets if isinstance(run.targets, str) else list(run.targets)
        model = get_peft_model(model, LoraConfig(r=run.rank, lora_alpha=2 * run.rank, target_modules=targets,
                                                 task_type="CAUSAL_LM", use_dora=run.use_dora,
                                                 use_rslora=run.use_rslora, init_lora_weights=run.init))
        if run.loraplus_ratio:
            optimizers = (create_loraplus_optimizer(model, torch.optim.AdamW, lr=run.learning_rate,
                                                    loraplus_lr_ratio=run.loraplus_ratio), None)
    return SFTTrainer(model=model, args=args, train_dataset=to_dataset(train_rows), processing_class=tokenizer,
                      optimizers=optimizers)


@pytest.fixture(scope="module")
def data(tiny_model_dir: Path) -> ExperimentData:
    from utils.data import load_chat_jsonl
    from utils.config import DATASET_TEST, DATASET_TRAIN
    from utils.models import load_tokenizer

    train, validation = ex.split_validation(load_chat_jsonl(DATASET_TRAIN)[:12], 4)
    skills, names = ex.heldout_skills(6)
    return ExperimentData(str(tiny_model_dir), load_tokenizer(str(tiny_model_dir)), train,
                          [r["messages"] for r in validation],
                          [r["messages"] for r in load_chat_jsonl(DATASET_TEST)[:4]], skills, names)


@pytest.fixture(scope="module")
def base(data: ExperimentData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    return ex.measure_base(data, tmp_path_factory.mktemp("base"))


def test_measurements_have_every_number(data: ExperimentData, base: dict[str, float]) -> None:
    assert set(base) == {"task_exact_match", "task_loss", "skills_exact_match", "skills_content_match", "skills_loss",
                         "validation_exact_match", "validation_loss", "skills_answers"}
    assert all(0.0 <= base[k] <= 1.0 for k in ex.RATES)
    assert len(base["skills_answers"]) == len(data.skills) and all(isinstance(a, str) for a in base["skills_answers"])
    # what exact match accepts, content match accepts too
    assert base["skills_content_match"] >= base["skills_exact_match"]
    assert base["task_loss"] > 0 and base["skills_loss"] > 0


def test_full_fine_tuning_trains_every_parameter_and_lora_only_adapters(data, base, tmp_path: Path) -> None:
    full = ex.run_experiment(Run(method="full", learning_rate=1e-3, batch_size=4), _make_trainer, data, base, tmp_path)
    lora = ex.run_experiment(Run(rank=4, learning_rate=1e-2, batch_size=4), _make_trainer, data, base, tmp_path)
    assert full["trainable_parameters"] == full["total_parameters"]
    assert 0 < lora["trainable_parameters"] < lora["total_parameters"] // 5
    assert lora["saved_bytes"] < full["saved_bytes"]
    assert full["steps"] == lora["steps"] == 2
    assert ex.check_records([full, lora]) == []
    assert not (tmp_path / "scratch" / Path(ex._cache_path(Run(), tmp_path).stem)).exists()


def test_attention_only_trains_fewer_parameters_than_all_linear(data, base, tmp_path: Path) -> None:
    attention = ex.run_experiment(Run(rank=4, targets=ex.ATTENTION, batch_size=4), _make_trainer, data, base, tmp_path)
    every = ex.run_experiment(Run(rank=4, batch_size=4), _make_trainer, data, base, tmp_path)
    assert attention["trainable_parameters"] < every["trainable_parameters"]


def test_an_untrained_run_forgets_nothing(data, base, tmp_path: Path) -> None:
    """At learning rate 0 LoRA's B stays zero, so the model is the base: forgetting is exactly zero."""
    record = ex.run_experiment(Run(rank=4, learning_rate=0.0, batch_size=4), _make_trainer, data, base, tmp_path)
    assert record["forgetting_exact_match"] == 0.0 and record["forgetting_content"] == 0.0
    assert record["skills_answers"] == base["skills_answers"]
    assert record["forgetting_loss"] == pytest.approx(0.0, abs=1e-6)
    assert record["task_exact_match"] == base["task_exact_match"]


@pytest.mark.parametrize("run", [Run(use_dora=True), Run(use_rslora=True), Run(init="pissa"), Run(init="olora"),
                                 Run(loraplus_ratio=16.0)], ids=lambda r: r.variant)
def test_every_variant_trains_on_cpu(run: Run, data, base, tmp_path: Path) -> None:
    from dataclasses import replace

    record = ex.run_experiment(replace(run, rank=2, batch_size=4, learning_rate=1e-3), _make_trainer, data, base,
                               tmp_path)
    assert record["variant"] == run.variant
    assert ex.check_records([record]) == []


def test_a_cached_run_is_reused_and_a_changed_one_is_not(data, base, tmp_path: Path) -> None:
    run = Run(rank=2, batch_size=4)
    first = ex.run_experiment(run, _make_trainer, data, base, tmp_path)

    def must_not_train(*args):
        raise AssertionError("a cached run was trained again")

    again = ex.run_experiment(run, must_not_train, data, base, tmp_path)
    assert not first["cached"] and again["cached"] and again["task_loss"] == first["task_loss"]
    with pytest.raises(AssertionError, match="trained again"):
        ex.run_experiment(Run(rank=2, batch_size=4, seed=7), must_not_train, data, base, tmp_path)

    # The same settings on a rebuilt base (same folder, other weights) must train again, not reuse the cache.
    import dataclasses
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "base-folder"
    shutil.copytree(data.model_path, folder)
    here = dataclasses.replace(data, model_path=str(folder))
    cache = tmp_path / "cache"
    ex.run_experiment(run, _make_trainer, here, base, cache)
    assert ex.run_experiment(run, must_not_train, here, base, cache)["cached"]
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="trained again"):
        ex.run_experiment(run, must_not_train, here, base, cache)


def test_run_names_and_variants() -> None:
    assert Run().variant == "LoRA" and Run(method="full").variant == "full FT"
    assert Run(use_dora=True).variant == "DoRA" and Run(init="pissa").variant == "PiSSA"
    assert Run(init="pissa_niter_4").variant == "PiSSA"
    assert Run(loraplus_ratio=16.0).variant == "LoRA+" and Run(use_rslora=True).variant == "rsLoRA"
    assert Run(targets=ex.MLP).name == "LoRA r16 MLP lr 8.0e-3 4ep"
    assert Run(method="full", learning_rate=2.5e-4).name == "full FT lr 2.5e-4 4ep"
    assert Run(seed=43).name == "LoRA r16 all-linear lr 8.0e-3 4ep seed 43"  # seeds are cached apart
    assert [Run().label, Run(rank=4).label, Run(targets=ex.MLP).label, Run(method="full", rank=4).label] == [
        "LoRA", "LoRA r4", "LoRA MLP", "full FT"]
    with pytest.raises(ValueError, match="lora"):
        Run(method="qlora")


def test_grids() -> None:
    full, reduced = ex.grid("full"), ex.grid("reduced")
    assert len(set(r.name for r in full)) == len(full) and all("/" not in r.name for r in full)
    assert set(reduced) <= set(full)  # the default grid's runs are the full grid's: the cache serves both
    assert {r.label for r in reduced} == {"LoRA", "full FT"}
    for label in ex.CORE:  # the runs the conclusions rest on: every rate with three seeds
        mine = [r for r in full if r.label == label]
        assert len(mine) == 3 * len({r.learning_rate for r in mine}) and {r.seed for r in mine} == set(ex.SEEDS)
    assert max(ex.CORE["PiSSA"][1]) > 8e-3  # PiSSA's sweep extended past its old edge, where its best rate sat
    for mode in ex.MODES:  # the real model: nothing that cannot fit a T4
        t4 = ex.grid(mode, miniature=False)
        assert t4 and all(r.method == "lora" and r.seed == 42 for r in t4)
    with pytest.raises(ValueError, match="reduced, full"):
        ex.grid("everything")


def test_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHI3_LAB_EXPERIMENTS", raising=False)
    assert ex.experiments_mode() == "reduced"
    monkeypatch.setenv("PHI3_LAB_EXPERIMENTS", "FULL")
    assert ex.experiments_mode() == "full"
    monkeypatch.setenv("PHI3_LAB_EXPERIMENTS", "everything")
    with pytest.raises(ValueError, match="reduced, full"):
        ex.experiments_mode()


def _record(name: str, variant: str, task: float, forgot: float, lr: float = 1e-3, seed: int = 42,
            content: float | None = None, **extra) -> dict:
    content = forgot / 2 if content is None else content
    return {"name": name, "variant": variant, "label": variant, "run": {"learning_rate": lr, "seed": seed},
            "task_exact_match": task, "skills_exact_match": 0.9 - forgot, "skills_content_match": 0.95 - content,
            "validation_exact_match": task, "task_loss": 1.0, "skills_loss": 0.1, "validation_loss": 1.0 - task,
            "forgetting_exact_match": forgot, "forgetting_content": content, "forgetting_loss": forgot,
            "trainable_parameters": 10, "saved_bytes": 40, "train_seconds": 1.0, **extra}


BASE = {"task_exact_match": 0.0, "skills_exact_match": 0.9, "skills_content_match": 0.95}


def _sweep(label: str, points: list[tuple[float, float]], seed: int = 42, rates=(1e-3, 4e-3, 1.6e-2, 6.4e-2)):
    return [_record(f"{label} {lr} {seed}", label, task, forgot, lr, seed) for lr, (task, forgot) in zip(rates, points)]


def test_a_sweep_is_read_from_the_base_up_to_the_rate_that_learned_most() -> None:
    # the third rate learned most; the fourth learned less and forgot more (the other branch); the second learned
    # no more than the first and is skipped
    records = _sweep("LoRA", [(0.4, 0.2), (0.4, 0.3), (0.8, 0.6), (0.5, 0.9)])
    curve = ex.rising_curve(records, "LoRA", 42, BASE)
    assert curve == [(0.0, 0.0), (0.4, 0.2), (0.8, 0.6)]
    assert ex.read_curve(curve, 0.6) == pytest.approx(0.4)
    assert ex.read_curve(curve, 0.2) == pytest.approx(0.1)  # between the base and the lowest rate
    assert ex.read_curve(curve, 0.8) == pytest.approx(0.6) and ex.read_curve(curve, 0.85) is None
    assert ex.rising_curve(records, "DoRA", 42, BASE) == []


def test_equal_learning_compares_at_one_level_and_judges_by_the_seeds_spread() -> None:
    records = []
    for seed, shift in zip(ex.SEEDS, (0.0, 0.02, -0.02)):
        records += _sweep("LoRA", [(0.5, 0.5 + shift), (0.9, 0.9 + shift)], seed)
        records += _sweep("full FT", [(0.5, 0.2 + shift), (0.7, 0.4 + shift)], seed)
    assert ex.common_level(records, BASE, ["LoRA", "full FT"]) == pytest.approx(0.7)
    rows = {r["method"]: r for r in ex.equal_learning(records, BASE, 0.7)}
    assert rows["LoRA"]["exact mean"] == pytest.approx(0.7) and rows["full FT"]["exact mean"] == pytest.approx(0.4)
    assert rows["LoRA"]["exact min"] == pytest.approx(0.68) and rows["LoRA"]["exact max"] == pytest.approx(0.72)
    assert ex.compare(rows["full FT"], rows["LoRA"]) == "full FT forgets less, beyond the seeds' spread"
    close = [dict(r, **{"exact mean": m, "exact min": m - 0.1, "exact max": m + 0.1})
             for r, m in ((rows["LoRA"], 0.5), (rows["full FT"], 0.45))]
    assert ex.compare(*close).startswith("within the seeds' spread")
    one = [dict(r, seeds=1) for r in close]
    assert "one seed" in ex.compare(*one)
    assert ex.equal_learning(records, BASE, 0.95)[0]["exact mean"] is None  # never reached
    level = ex.common_level(records, BASE, ["LoRA", "full FT"])
    assert ex.check_equal_learning(0.4, records, BASE, "full FT", 42, level) == "correct"
    assert ex.check_equal_learning(0.5, records, BASE, "full FT", 42, level).startswith("not yet")


def test_best_rate_averages_the_seeds() -> None:
    records = _sweep("LoRA", [(0.9, 0.5), (0.5, 0.6)], 42) + _sweep("LoRA", [(0.5, 0.5), (0.8, 0.6)], 43)
    # rate 1e-3: mean 0.7; 4e-3: mean 0.65
    assert ex.best_rate(records, "LoRA") == 1e-3
    with pytest.raises(ValueError, match="DoRA"):
        ex.best_rate(records, "DoRA")


def _skills_data() -> ExperimentData:
    skills = [[{"role": "user", "content": "Label each word in: the sink on wed"},
               {"role": "assistant", "content": "thing: sink | day: wed"}],
              [{"role": "user", "content": "Which word is a day: urgent ideally wednesday?"},
               {"role": "assistant", "content": "wednesday"}],
              [{"role": "user", "content": "Convert 968 cm to mm."}, {"role": "assistant", "content": "9680 mm"}]]
    return ExperimentData("m", None, [], [], [], skills, ["tag", "pick_category", "unit_conversion"])


def test_format_switches_and_forgotten_examples() -> None:
    data = _skills_data()
    base = {"skills_answers": ["thing: sink | day: wed", "wednesday", "9680 mm"]}
    run = {"skills_answers": ["FIX | item: sink | day: wed", "urgent", "9680 mm"]}
    share = ex.format_switches([run], base, data)
    assert share == {"lost": pytest.approx(2 / 3), "format switched": pytest.approx(0.5)}
    table = ex.forgotten_examples(run, base, data)
    assert list(table["skill"]) == ["tag", "pick_category"] and list(table["content kept"]) == [True, False]
    assert ex.content_scores(data, run["skills_answers"]) == [True, False, True]


def test_findings_are_verdicts_computed_from_the_runs() -> None:
    data = _skills_data()
    base = {**BASE, "skills_answers": ["thing: sink | day: wed", "wednesday", "9680 mm"]}
    answers = {"skills_answers": ["FIX | item: sink | day: wed", "urgent", "9680 mm"]}
    records = []
    for seed, shift in zip(ex.SEEDS, (0.0, 0.02, -0.02)):
        records += [dict(r, **answers)
                    for r in _sweep("LoRA", [(0.3, 0.3 + shift), (0.5, 0.5 + shift), (0.9, 0.9 + shift)], seed)]
        records += [dict(r, **answers, run={**r["run"], "method": "full"})
                    for r in _sweep("full FT", [(0.3, 0.1 + shift), (0.5, 0.2 + shift), (0.7, 0.4 + shift)], seed)]
    for r in records:
        r["run"].setdefault("method", "lora")
    found = ex.findings(records, base, data)
    assert list(found) == [*ex.SHARED_FINDINGS, *ex.FULL_FINDINGS]
    assert found["lowest rate, least forgetting"] == "in every sweep"
    assert found["less forgetting at equal learning, full FT or LoRA (exact match)"] == "full FT"
    assert found["full FT vs LoRA against the seeds' spread (exact match)"] == (
        "full FT forgets less, beyond the seeds' spread")
    assert found["PiSSA vs LoRA at equal learning (exact match)"] == ex.NEEDS_FULL
    assert found["forgetting that is format switching"] == "some of it"  # half of the lost answers
    assert found["best rate at a sweep's edge"] == "LoRA, full FT"  # both learned most at their top rate
    # one run per method (the default grid): the same direction, and no verdict on what it cannot show
    one = ex.findings([r for r in records if r["run"]["seed"] == 42 and r["run"]["learning_rate"] == 4e-3], base, data)
    assert all(one[k] == found[k] for k in ex.SHARED_FINDINGS)
    assert all(one[k] == ex.NEEDS_FULL for k in ex.FULL_FINDINGS)


def test_results_json_and_its_checks(outputs: Path) -> None:
    good = _record("a", "LoRA", 0.9, 0.1)
    path = ex.experiments_dir() / "results.json"
    written = ex.write_results(path, [{**good, "cached": True}], {"skills_exact_match": 1.0}, {"mode": "reduced"})
    assert json.loads(path.read_text()) == written and "cached" not in written["runs"][0] and written["date"]
    assert path.is_relative_to(outputs)
    bad = _record("b", "LoRA", 1.5, float("nan"))
    problems = ex.check_records([bad])
    assert any("task_exact_match" in p for p in problems) and any("forgetting_exact_match" in p for p in problems)
    with pytest.raises(ValueError, match="not written"):
        ex.write_results(path, [bad], {}, {})


def test_plots_have_one_line_per_method_and_one_bar_pair_per_method() -> None:
    records = _sweep("LoRA", [(0.5, 0.5), (0.9, 0.9)]) + _sweep("full FT", [(0.5, 0.2), (0.7, 0.4)])
    fig = ex.learn_vs_forget(records, BASE, 0.7)
    assert len(fig.axes) == 2 and all(len(ax.lines) >= 2 for ax in fig.axes)
    rows = ex.equal_learning(records, BASE, 0.7)
    bars = ex.equal_learning_bars(rows)
    assert len(bars.axes[0].patches) == 2 * len(rows)


def test_exercise_checks() -> None:
    from peft import LoraConfig

    good = LoraConfig(r=8, target_modules=list(ex.MLP), use_dora=True)
    assert ex.check_lora_config(good, 8, ex.MLP, True) == "correct"
    assert "use_dora" in ex.check_lora_config(LoraConfig(r=8, target_modules=list(ex.MLP)), 8, ex.MLP, True)
    record = _record("a", "LoRA", 0.9, 0.25)
    base = {"skills_exact_match": 0.9}
    assert ex.check_forgetting(0.25, base, record) == "correct"
    assert ex.check_forgetting(0.1, base, record).startswith("not yet")
    assert ex.check_forgetting(0.125, {"skills_content_match": 0.95}, record, content=True) == "correct"
    assert ex.forgetting({"skills_exact_match": 0.9, "skills_loss": 0.1, "skills_content_match": 0.9},
                         {"skills_exact_match": 0.6, "skills_loss": 0.4, "skills_content_match": 0.8}) == pytest.approx(
        {"forgetting_exact_match": 0.3, "forgetting_loss": 0.3, "forgetting_content": 0.1})
