"""The benchmarks in bench/: padding-free correctness with sdpa, and tiny end-to-end runs of each script."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from utils import config
from utils.data import load_chat_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _conversations(tokenizer, n: int) -> list[list[int]]:
    rows = load_chat_jsonl(config.DATASET_TRAIN)[:n]
    return [tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"] for r in rows]


def _load(path: Path, attn: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sliding_window", [None, 16])
def test_packed_logits_equal_separate_logits(tiny_model_dir: Path, attn: str, sliding_window: int | None) -> None:
    """Sequences packed into one row with restarting position ids, no attention mask, give each sequence's own
    logits: transformers builds a block-diagonal causal mask from the position ids (sliding window included,
    as Phi-3 Mini's config has one)."""
    model, tokenizer = _load(tiny_model_dir, attn)
    model.config.sliding_window = sliding_window
    seqs = _conversations(tokenizer, 3)
    assert len({len(s) for s in seqs}) > 1
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([s]), use_cache=False).logits[0] for s in seqs])
        packed = torch.tensor([[t for s in seqs for t in s]])
        positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
        mixed = model(input_ids=packed, use_cache=False).logits[0]
    assert torch.allclose(together, alone, atol=1e-4), (together - alone).abs().max()
    assert (mixed - alone).abs().max() > 1e-2, "control: without restarting position ids the sequences must mix"


def test_padding_free_and_packed_batches_give_padded_batch_loss_and_gradients(tiny_model_dir: Path) -> None:
    """TRL's collator gives the same loss and gradients with sdpa on CPU whether the conversations are padded,
    concatenated padding-free (``padding_free=True``), or pre-packed into rows as ``packing=True`` with the
    "bfd" strategy leaves them (``seq_lengths`` -> restarting position ids)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, tokenizer = _load(tiny_model_dir, "sdpa")
    model.train()
    seqs = _conversations(tokenizer, 5)
    layouts = {
        "padded": (False, [{"input_ids": ids} for ids in seqs]),
        "padding_free": (True, [{"input_ids": ids} for ids in seqs]),
        "packed_rows": (True, [{"input_ids": seqs[0] + seqs[1] + seqs[2], "seq_lengths": [len(s) for s in seqs[:3]]},
                               {"input_ids": seqs[3] + seqs[4], "seq_lengths": [len(s) for s in seqs[3:]]}]),
    }
    results = {}
    for name, (padding_free, examples) in layouts.items():
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)
        batch = collator(examples)
        assert ("attention_mask" in batch) is not padding_free
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results[name] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    padded_loss, padded_grads = results.pop("padded")
    for name, (loss, grads) in results.items():
        assert math.isclose(padded_loss, loss, rel_tol=1e-5), name
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(padded_grads, grads)), name


def _run(args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PHI3_LAB_OUTPUTS": str(tmp_path / "outputs")}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_packing_bench_tiny_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """bench/packing.py end to end on a few conversations: every setting trains on the same conversations and
    real tokens, and the JSON has the documented shape."""
    out = tmp_path / "packing.json"
    _run(["bench/packing.py", "--model", str(tiny_model_dir), "--examples", "16", "--heldout", "4",
          "--repeats", "1", "--no-warmup", "--out", str(out)], tmp_path)
    result = json.loads(out.read_text())
    settings = result["settings"]
    assert set(settings) == {"padded_fixed", "dynamic_padding", "padding_free", "packing_bfd"}
    assert result["baseline"] == "padded_fixed" and result["best"] in settings
    assert result["ratio_best_vs_baseline"] >= 1.0
    for key in ("command", "machine", "date"):
        assert result[key]
    for name, s in settings.items():
        assert s["min"] <= s["median"] <= s["max"] and s["real_tokens_per_s"] > 0, name
        assert math.isfinite(s["heldout_loss"]), name
        assert s["conversations"] == 16 and s["real_tokens"] == settings["padded_fixed"]["real_tokens"], name
    assert settings["padded_fixed"]["laid_out_tokens"] % 256 == 0
    assert settings["padding_free"]["padding_fraction"] == settings["packing_bfd"]["padding_fraction"] == 0
    assert settings["padded_fixed"]["hf_num_input_tokens_seen"] == settings["padded_fixed"]["real_tokens"]
    same_batches = {settings[n]["heldout_loss"] for n in ("padded_fixed", "dynamic_padding", "padding_free")}
    assert max(same_batches) - min(same_batches) < 1e-3
    assert result["packed_logits_max_abs_diff"] < 1e-3


def test_lora_seeds_tiny_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    """bench/lora_seeds.py on the tiny base: one run per seed, every metric measured, the summary from the runs."""
    out = tmp_path / "lora_seeds.json"
    _run(["bench/lora_seeds.py", "--seeds", "0", "1", "--model", str(tiny_model_dir), "--examples", "16",
          "--heldout", "4", "--out", str(out)], tmp_path)
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for run in runs:
        assert run["steps"] > 0 and run["heldout_loss"] > 0 and "kind" in run["field_accuracy"]
        assert all(0 <= run[k] <= 1 for k in ("exact_match", "well_formed_sampled_t0.7", "well_formed_sampled_t1.0"))
    losses = [r["heldout_loss"] for r in runs]
    assert result["summary"]["heldout_loss"] == {"min": min(losses), "median": sum(losses) / 2, "max": max(losses)}
    assert result["command"].startswith(".venv/bin/python bench/lora_seeds.py") and result["date"]


def test_gpu_shape_tiny_run(tmp_path: Path) -> None:
    """bench/gpu_shape.py at tiny scale on CPU: LoRA and QLoRA both measured through the GPU script's code."""
    out = tmp_path / "gpu_shape.json"
    _run(["bench/gpu_shape.py", "--scale", "tiny", "--budget-s", "8", "--out", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert result["scale"] == "tiny" and result["dtype"] == "float32"
    ok = [r for r in result["results"] if r["status"] == "ok"]
    assert {r["method"] for r in ok} == {"lora", "qlora"}
    for row in ok:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] <= 1 and row["peak_memory_mb"] > 0
        assert all(math.isfinite(x) for x in row["losses"])
    assert set(result["best"]) <= {f"{m}@{s}" for m in ("lora", "qlora") for s in (32, 64)}
    assert result["parameters"]["total"] > result["parameters"]["matmul"] > 0
    assert result["models"]["qlora"]["nf4_layers"] == 4 * 2 and result["models"]["lora"]["nf4_layers"] == 0
    assert result["matmul_flops_per_s"] > 0 and result["command"] and result["date"]


def test_gpu_shape_counts_phi3_mini_on_meta() -> None:
    """Phi-3 Mini's published shape has 3,821,079,552 parameters; counting them allocates nothing."""
    from bench.gpu_shape import PHI3_MINI, PHI3_MINI_PARAMETERS, count_on_meta

    params = count_on_meta(PHI3_MINI)
    assert params["total"] == PHI3_MINI_PARAMETERS == 3_821_079_552
    assert params["embedding"] == 32064 * 3072


def test_gpu_shape_check_rejects_absurd_numbers() -> None:
    """The self-checks stop on NaN loss, MFU above 100% and non-positive throughput."""
    from bench.gpu_shape import Implausible, check

    good = {"losses": [10.3], "tokens_per_s": 1000.0, "mfu": 0.4}
    check(good, 32064)
    for bad in ({"losses": [float("nan")]}, {"mfu": 1.2}, {"tokens_per_s": 0.0}, {"losses": [80.0]}):
        with pytest.raises(Implausible):
            check({**good, **bad}, 32064)


def test_series_time_table(tmp_path: Path) -> None:
    """bench/series_time.py splits each chapter's time into kernel overhead and the kinds of its slowest cells."""
    from bench.series_time import breakdown, main, table

    chapter = {"notebook": "03_lora_finetuning.ipynb", "seconds": 100.0, "cells_seconds": 90.0,
               "slowest_cells": [{"cell": 9, "seconds": 60.0, "starts": "trainer = train_sft(model, tokenizer, rows)"},
                                 {"cell": 12, "seconds": 20.0, "starts": "after = evaluate_generation(trainer.model"},
                                 {"cell": 2, "seconds": 5.0, "starts": "import pandas as pd"}]}
    split = breakdown(chapter)
    assert split["kernel + overhead"] == 10.0 and split["training"] == 60.0 and split["evaluation"] == 20.0
    assert split["imports/setup"] == 5.0 and split["rest of cells"] == 5.0
    path = tmp_path / "run_times.json"
    path.write_text(json.dumps({"model": "miniature", "total_seconds": 100.0, "chapters": [chapter]}))
    assert main([str(path)]) == 0
    assert "CPU s:" not in table({"chapters": [chapter]}), "an older report has no CPU times to show"
    timed = {**chapter, "cpu_seconds": 41.6}
    path.write_text(json.dumps({"model": "miniature", "total_seconds": 100.0, "total_cpu_seconds": 41.6,
                                "load_average": [3.0, 2.0, 1.0], "chapters": [timed]}))
    assert main([str(path)]) == 0 and table({"chapters": [timed]}).splitlines()[-1] == "CPU s: 03 42"


def test_series_time_classifies_a_cell_by_its_code_not_its_first_import(tmp_path: Path) -> None:
    """A training cell that opens with imports is training; a cell of imports and settings alone is imports/setup."""
    from bench.series_time import breakdown, category, main

    training = "from peft import LoraConfig\nfrom trl import SFTConfig, SFTTrainer\n\ntrainer = SFTTrainer(model)\ntrainer.train()"
    setup = "# settings\nfrom utils import config\n\nconfig.silence_library_noise()\nimport torch"
    evaluation = "from utils.metrics import evaluate_generation\nscores, _ = evaluate_generation(model, tok, rows)"
    loading = "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(path)"
    assert [category(s) for s in (training, setup, evaluation, loading)] == [
        "training", "imports/setup", "evaluation", "model"]
    chapter = {"notebook": "03_lora_finetuning.ipynb", "seconds": 50.0, "cells_seconds": 48.0,
               "cells": [{"cell": 1, "seconds": 6.0, "starts": "# settings", "source": setup},
                         {"cell": 5, "seconds": 40.0, "starts": "from peft import LoraConfig", "source": training},
                         {"cell": 7, "seconds": 2.0, "starts": "from utils.metrics import evaluate_generation",
                          "source": evaluation}]}
    split = breakdown(chapter)
    assert (split["training"], split["imports/setup"], split["evaluation"]) == (40.0, 6.0, 2.0)
    assert split["rest of cells"] == 0.0
    path = tmp_path / "run_times.json"
    path.write_text(json.dumps({"model": "miniature", "total_seconds": 50.0, "chapters": [chapter]}))
    assert main([str(path)]) == 0
    assert main([str(tmp_path / "missing.json")]) == 1


def _bench_script(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, config.PROJECT_ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_by_depth_extrapolates_linearly_and_picks_the_smallest_gpu() -> None:
    """Two depths fix the line; 32 layers are read off it; the GPU estimate halves what lies above the baseline."""
    bench = _bench_script("memory_by_depth")
    peaks = {1: {"01_data_preparation": 500, "03_lora_finetuning": 1500},
             2: {"01_data_preparation": 500, "03_lora_finetuning": 2000}}
    rows = {r["chapter"]: r for r in bench.estimate(peaks)}
    lora = rows["03_lora_finetuning"]
    assert lora["per_layer_mib"] == 500 and lora["fixed_mib"] == 1000
    assert lora["cpu_fp32_32_layers_gib"] == round((1000 + 32 * 500) / 1024, 1)
    assert lora["gpu_16bit_gib"] == round(((1000 + 32 * 500 - 500) / 2 + bench.CUDA_OVERHEAD_MIB) / 1024, 1)
    assert lora["smallest_gpu"] == "Colab T4" and bench.smallest_gpu(30) == "A100 40 GB"
    assert bench.smallest_gpu(100) == "more than 80 GB"
    assert "| 03_lora_finetuning |" in bench.markdown(list(rows.values()))


def test_memory_by_depth_names_the_cell_that_grows_most_with_depth(outputs: Path) -> None:
    """The cell that sets a chapter's peak on Phi-3 Mini is the one largest at 32 layers, not at 2."""
    bench = _bench_script("memory_by_depth")
    peaks = {1: {3: 1000, 5: 1500}, 2: {3: 1100, 5: 1550}}  # cell 5 is larger at 2 layers, cell 3 at 32
    for layers, cells in peaks.items():
        report = outputs / "real-shape" / f"{layers}-layers" / "run_times.json"
        report.parent.mkdir(parents=True)
        report.write_text(json.dumps({"chapters": [{"notebook": "04_qlora_finetuning.ipynb", "cells": [
            {"cell": cell, "starts": f"cell {cell}", "peak_mib": mib} for cell, mib in cells.items()]}]}))
    found = bench.peak_cells()["04_qlora_finetuning"]
    assert found == {"cell": 3, "starts": "cell 3", "peaks_mib": [1000, 1100]}


def test_memory_by_depth_follows_the_cell_that_sets_the_peak_at_32_layers() -> None:
    """Cell 6 peaks at 1 layer, cell 26 at 2: the line through the chapter's peaks joins two steps and runs below
    cell 26's own line, which the estimate uses."""
    bench = _bench_script("memory_by_depth")
    peaks = {1: {"01_data_preparation": 500, "07_deployment": 2857}, 2: {"01_data_preparation": 500,
                                                                          "07_deployment": 3472}}
    chapter_line = bench.estimate(peaks)[1]
    rows = {r["chapter"]: r for r in bench.estimate(peaks, {"07_deployment": [2676, 3472]})}
    assert chapter_line["per_layer_mib"] == 615
    assert rows["07_deployment"]["per_layer_mib"] == 796 and rows["07_deployment"]["fixed_mib"] == 2676 - 796
    assert rows["07_deployment"]["cpu_fp32_32_layers_gib"] > chapter_line["cpu_fp32_32_layers_gib"]
    lower = bench.estimate(peaks, {"07_deployment": [2000, 2100]})[1]  # a cell line below the chapter's: unused
    assert lower["per_layer_mib"] == 615


def test_export_memory_fits_a_line_through_two_depths() -> None:
    """bench/export_memory.py: chapter 07's int4 export peak on Phi-3 Mini, read off the line through 1 and 2 layers."""
    bench = _bench_script("export_memory")
    fit = bench.extrapolate({2: 3700, 1: 3000})
    assert fit == {"per_layer_mib": 700, "fixed_mib": 2300, "phi3_mini_gib": round((2300 + 32 * 700) / 1024, 1)}


def test_memory_by_depth_splits_a_cpu_chapter_into_gpu_and_host_ram() -> None:
    """Chapter 07's transformers cells would sit on the GPU; its builder, ONNX Runtime and llama.cpp cells stay on the
    CPU: the first give the GPU estimate, the second the host RAM, and a free Colab needs both to fit."""
    bench = _bench_script("memory_by_depth")
    peaks = {1: {"01_data_preparation": 500, "07_deployment": 2700}, 2: {"01_data_preparation": 500,
                                                                          "07_deployment": 3500}}
    gpu_cell = {"cell": 11, "starts": "answers", "peaks_mib": [2700, 3500]}
    cpu_cell = {"cell": 6, "starts": "exports", "peaks_mib": [2000, 2300]}
    row = bench.estimate(peaks, None, {"07_deployment": {"gpu": gpu_cell, "cpu": cpu_cell}})[1]
    assert row["gpu_16bit_gib"] == round(bench.gpu_estimate_mib(2700 + 31 * 800, 500) / 1024, 1)
    assert row["host_ram_gib"] == round((2000 + 31 * 300) / 1024, 1) and row["smallest_gpu"] == "Colab T4"
    assert f"; host RAM {row['host_ram_gib']} GiB" in bench.markdown([row])
    cpu_cell["peaks_mib"] = [2000, 2500]  # 17.1 GiB of host RAM: more than a free Colab has
    row = bench.estimate(peaks, None, {"07_deployment": {"gpu": gpu_cell, "cpu": cpu_cell}})[1]
    assert row["smallest_gpu"].startswith("L4")


def test_export_within_a_memory_limit_fails_below_it_and_finishes_above() -> None:
    """``--full-depth-within``: the export runs in a memory cgroup, so a limit too small must end it (an OOM kill),
    one large enough must not; where no memory cgroup can be made, one clear line says so."""
    bench = _bench_script("export_memory")
    source = config.MINIATURE_DIR
    if not os.access(bench.MEMORY_CGROUPS, os.W_OK):
        pytest.skip(f"{bench.MEMORY_CGROUPS} is not writable here")
    too_small = bench.export_within(source, "fp32", 0.1)
    assert not too_small["finished"] and too_small["oom_kills"] >= 1
    enough = bench.export_within(source, "fp32", 4)
    assert enough["finished"] and 0 < enough["group_peak_mib"] <= 4 * 1024 and enough["process_peak_mib"][0] > 0
    assert not any(p.name.startswith("phi3-lab-export-") for p in bench.MEMORY_CGROUPS.iterdir())  # removed after


def test_export_within_says_in_one_line_when_no_memory_cgroup_can_be_made(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench_script("export_memory")
    monkeypatch.setattr(bench, "MEMORY_CGROUPS", tmp_path / "no-such-controller")
    with pytest.raises(SystemExit, match="needs a writable memory cgroup: cannot create .*no-such-controller"):
        bench.export_within(config.MINIATURE_DIR, "fp32", 4)
