"""The real-model path, executed: every chapter with ``PHI3_MODEL_ID`` on a Phi-3-Mini-shaped stand-in (short run).

The stand-in has Phi-3-mini-4k-instruct's width, heads, vocabulary, rope, context, special-token ids and strip
settings and chat template, with 2 random layers (``utils/standin.py``); ``scripts/smoke_real_shape.py`` runs the
chapters on it with two training steps and eight held-out conversations. About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_shape  # not in `make test`: `make test-real-shape`, which .ci/run calls after it

LAYERS = 2
CHAPTERS = ["00_setup", "01_data_preparation", "02_lora_from_scratch", "03_lora_finetuning", "04_qlora_finetuning",
            "05_inference", "06_evaluation", "07_deployment", "08_learning_and_forgetting", "09_your_own_task"]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """Run the whole series once on the stand-in; returns (run_times.json, the run's output folder)."""
    import os
    import subprocess
    import sys

    from utils import config

    outputs = tmp_path_factory.mktemp("real-shape-outputs")
    script = config.PROJECT_ROOT / "scripts" / "smoke_real_shape.py"
    done = subprocess.run([sys.executable, str(script), "--layers", str(LAYERS)],
                          env={**os.environ, "PHI3_LAB_OUTPUTS": str(outputs)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = outputs / "real-shape" / f"{LAYERS}-layers"
    return json.loads((folder / "run_times.json").read_text()), folder


def test_every_chapter_runs_on_the_real_shape(series: tuple[dict, Path]) -> None:
    report, _ = series
    assert [c["notebook"].removesuffix(".ipynb") for c in report["chapters"]] == CHAPTERS
    assert report["model"].endswith(f"phi3-mini-shape-{LAYERS}-layers")


def test_the_standin_has_phi3_minis_shape(series: tuple[dict, Path]) -> None:
    report, _ = series
    settings = json.loads((Path(report["model"]) / "config.json").read_text())
    assert (settings["hidden_size"], settings["intermediate_size"], settings["num_attention_heads"],
            settings["vocab_size"], settings["max_position_embeddings"]) == (3072, 8192, 32, 32064, 4096)
    assert settings["num_hidden_layers"] == LAYERS


def test_short_run_products_are_complete_and_merges_are_saved_in_16_bits(series: tuple[dict, Path]) -> None:
    """Adapters and merges exist, the merges are saved in 16 bits as a GPU run saves them (a CPU run trains in fp32
    but saves in the base checkpoint's bf16: ``utils.models.merge_save_dtype``), and no temporary merge is left
    behind."""
    report, outputs = series
    for name in ("loralib", "lora", "qlora", "lora_merged", "qlora_merged"):
        assert any((outputs / "adapters" / name).iterdir()), name
    base_dtype = json.loads((Path(report["model"]) / "config.json").read_text())["dtype"]
    assert base_dtype == "bfloat16"
    for name in ("lora_merged", "qlora_merged"):
        assert json.loads((outputs / "adapters" / name / "config.json").read_text())["dtype"] == base_dtype
    stats = json.loads((outputs / "adapters" / "lora" / "run_stats.json").read_text())
    assert stats["steps"] == 2
    capstone = outputs / "capstone"  # chapter 09: its own adapter and merged model, short run, held-out capped
    assert json.loads((capstone / "merged" / "config.json").read_text())["dtype"] == base_dtype
    capstone_stats = json.loads((capstone / "adapter" / "run_stats.json").read_text())
    assert capstone_stats["steps"] == 2 and len(capstone_stats["answers"]) == 8
    assert not (outputs / "tmp").exists()
    assert json.loads((outputs / "eval" / "results.json").read_text())["n_test"] == 8


def test_every_chapter_reports_its_peak_memory(series: tuple[dict, Path]) -> None:
    report, _ = series
    for chapter in report["chapters"]:
        assert chapter["peak_memory_mib"]["process_mib"] > 0, chapter["notebook"]


def test_the_onnx_export_of_the_real_shape_tokenizes_and_computes_like_transformers(series: tuple[dict, Path],
                                                                                   tmp_path: Path) -> None:
    """Chapter 07's parity rests on two things at Phi-3 Mini's shape: ONNX Runtime GenAI's tokenizer reads the
    prompt into the same ids as transformers (a SentencePiece-style vocabulary with Phi-3's rstrip tokens), and an
    fp32 export computes the same logits. On a model other than the miniature the chapter exports int4 only (what
    fits a Colab's RAM), so the fp32 export is made here, from the chapter's (16-bit) merged model, and compared
    with transformers computing in fp32 from the same weights."""
    import numpy as np
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils import config
    from utils.data import load_chat_jsonl

    _, outputs = series
    merged = outputs / "adapters" / "lora_merged"
    hf_tokenizer = AutoTokenizer.from_pretrained(merged)
    from utils.deployment import export_onnx

    assert (outputs / "deploy" / "lora_int4" / "genai_config.json").is_file(), "chapter 07 exported no int4 model"
    fp32 = export_onnx(merged, tmp_path / "lora_fp32", "fp32")
    model = og.Model(str(fp32.folder))
    ort_tokenizer = og.Tokenizer(model)
    prompts = [row["messages"][:-1] for row in load_chat_jsonl(config.DATASET_TEST)][:40]
    for messages in prompts:
        text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == ort_tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        assert [int(i) for i in ort_tokenizer.encode(text)] == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 4)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    ort_logits = np.array(generator.get_output("logits"))[0, -1]
    with torch.no_grad():
        hf_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        hf_logits = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(ort_logits - hf_logits).max() < 1e-3
