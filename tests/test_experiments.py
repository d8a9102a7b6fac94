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
    assert set(base) == {"task_exact_match", "task_loss", "skills_exact_match", "skills_loss",
                         "validation_exact_match", "validation_loss"}
    assert all(0.0 <= base[k] <= 1.0 for k in ex.RATES)
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
    assert record["forgetting_exact_match"] == 0.0
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
    assert Run(loraplus_ratio=16.0).variant == "LoRA+" and Run(use_rslora=True).variant == "rsLoRA"
    assert Run(targets=ex.MLP).name == "LoRA r16 MLP lr 8.0e-3 4ep"
    assert Run(method="full", learning_rate=2.5e-4).name == "full FT lr 2.5e-4 4ep"
    names = [r.name for r in ex.sweep_grid() + ex.shape_grid(8e-3)]
    assert len(ex.shape_grid(8e-3)) == 6  # r16 on all linear layers is in both sweeps, once
    assert len(set(ex.sweep_grid() + ex.shape_grid(8e-3))) == 18 + 5  # and it is stage 1's LoRA at 8e-3
    assert all("/" not in n for n in names)
    with pytest.raises(ValueError, match="lora"):
        Run(method="qlora")


def test_mode_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PHI3_LAB_EXPERIMENTS", raising=False)
    assert ex.experiments_mode() == "reduced"
    monkeypatch.setenv("PHI3_LAB_EXPERIMENTS", "FULL")
    assert ex.experiments_mode() == "full"
    monkeypatch.setenv("PHI3_LAB_EXPERIMENTS", "everything")
    with pytest.raises(ValueError, match="reduced, full"):
        ex.experiments_mode()


def _record(name: str, variant: str, task: float, forgot: float, lr: float = 1e-3, **extra) -> dict:
    return {"name": name, "variant": variant, "run": {"learning_rate": lr}, "task_exact_match": task,
            "skills_exact_match": 0.9 - forgot, "validation_exact_match": task, "task_loss": 1.0,
            "skills_loss": 0.1, "validation_loss": 1.0 - task, "forgetting_exact_match": forgot,
            "forgetting_loss": forgot, "trainable_parameters": 10, "saved_bytes": 40, "train_seconds": 1.0, **extra}


def test_best_run_and_pareto_front() -> None:
    records = [_record("a", "LoRA", 0.9, 0.1, 1e-3), _record("b", "LoRA", 0.8, 0.0, 4e-3),
               _record("c", "LoRA", 0.7, 0.2, 1.6e-2), _record("d", "full FT", 0.95, 0.3)]
    assert ex.best_run(records, "LoRA")["name"] == "a"
    assert ex.pareto_front(records) == ["a", "b", "d"]
    assert ex.check_pareto(["a", "b", "d"], records) == "correct"
    assert ex.check_pareto(["a", "c"], records).startswith("not yet")
    with pytest.raises(ValueError, match="DoRA"):
        ex.best_run(records, "DoRA")


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


def test_plots_have_one_point_per_run() -> None:
    records = [_record("a", "LoRA", 0.9, 0.1), _record("b", "DoRA", 0.8, 0.0), _record("c", "full FT", 0.7, 0.2)]
    for fig in (ex.learn_vs_forget(records), ex.score_vs_parameters(records)):
        points = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
        assert points == 3
    assert ex.score_vs_parameters(records).axes[0].get_xscale() == "log"


def test_exercise_checks() -> None:
    from peft import LoraConfig

    good = LoraConfig(r=8, target_modules=list(ex.MLP), use_dora=True)
    assert ex.check_lora_config(good, 8, ex.MLP, True) == "correct"
    assert "use_dora" in ex.check_lora_config(LoraConfig(r=8, target_modules=list(ex.MLP)), 8, ex.MLP, True)
    record = _record("a", "LoRA", 0.9, 0.25)
    base = {"skills_exact_match": 0.9}
    assert ex.check_forgetting(0.25, base, record) == "correct"
    assert ex.check_forgetting(0.1, base, record).startswith("not yet")
    assert ex.forgetting({"skills_exact_match": 0.9, "skills_loss": 0.1},
                         {"skills_exact_match": 0.6, "skills_loss": 0.4}) == pytest.approx(
        {"forgetting_exact_match": 0.3, "forgetting_loss": 0.3})
