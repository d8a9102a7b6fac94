"""Chapter 07's deployment helpers: a real ONNX Runtime GenAI export of the tiny miniature, and the pure parts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from utils.deployment import (ChatSession, builder_command, chat_widget, check_agreement, check_export, diff_table,
                              export_onnx, folder_size, model_card, ort_generate, time_tokens, transcript_html,
                              upload_plan, write_model_card)
from utils.deployment import lora_matmul_nodes

PROMPTS = [[{"role": "user", "content": "The door on floor 4 is broken, low priority."}],
           [{"role": "system", "content": "Answer with one ticket line."},
            {"role": "user", "content": "Book cedar room for three people on friday at 3pm."}]]


@pytest.fixture(scope="module")
def exports(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {p: export_onnx(tiny_model_dir, root / p, p).folder for p in ("fp32", "int4")}


def test_fp32_export_answers_like_transformers(tiny_model_dir: Path, exports: dict[str, Path]):
    import onnxruntime_genai as og

    from utils.metrics import generate
    from utils.models import load_model, load_tokenizer

    reference = generate(load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), PROMPTS,
                         max_new_tokens=12)
    model = og.Model(str(exports["fp32"]))
    answers = ort_generate(model, og.Tokenizer(model), PROMPTS, max_new_tokens=12)
    assert [a.text for a in answers] == [r.text for r in reference]
    assert [a.stopped for a in answers] == [r.stopped for r in reference]


def test_the_shipped_base_exports_with_the_same_logits(tmp_path: Path):
    """ONNX Runtime GenAI's builder 0.18 exports a Phi-3 whose vocabulary equals gate_up_proj's rows (2 x
    intermediate_size) wrongly (logits off by ~10 from the first token); the shipped base must not be such a model."""
    import numpy as np
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM

    from utils import config

    base = AutoModelForCausalLM.from_pretrained(config.miniature_dir())
    assert base.config.vocab_size != 2 * base.config.intermediate_size
    model = og.Model(str(export_onnx(config.miniature_dir(), tmp_path / "base", "fp32").folder))
    ids = [4, 203, 52, 385, 596]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=16)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    ort_logits = np.array(generator.get_output("logits"))[0, -1]
    with torch.no_grad():
        hf_logits = base(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(ort_logits - hf_logits).max() < 1e-3


def test_int4_export_is_smaller_and_checked_as_int4(exports: dict[str, Path]):
    assert folder_size(exports["int4"], "model.onnx*") < folder_size(exports["fp32"], "model.onnx*") / 2
    assert check_export(exports["int4"], "int4").startswith("right")
    assert check_export(exports["fp32"], "fp32").startswith("right")
    assert check_export(exports["fp32"], "int4").startswith("not yet")
    assert "bits=[4]" in check_export(exports["int4"], "int8")


def test_an_export_leaves_no_builder_object_in_memory(tiny_model_dir: Path, tmp_path: Path):
    """The builder's objects sit in reference cycles; left to Python's next full collection, a second export (or a
    model loaded next) would stack on the first's weights. export_onnx frees them before it returns."""
    import gc

    def builder_objects() -> int:  # the loaded model's modules and the graph built from them
        return sum(str(getattr(type(o), "__module__", "")).startswith(("onnx_ir", "transformers.models.phi3"))
                   for o in gc.get_objects())

    export_onnx(tiny_model_dir, tmp_path / "first", "int4")  # what the first export imports and caches stays
    gc.collect()
    before = builder_objects()
    gc.disable()  # no automatic collection may do export_onnx's work for it
    try:
        export_onnx(tiny_model_dir, tmp_path / "int4", "int4")
        left = builder_objects()
    finally:
        gc.enable()
    assert left == before


def test_export_refuses_an_adapter_folder_and_unknown_precision(tmp_path: Path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        export_onnx(tmp_path / "adapter", tmp_path / "out", "fp32")
    with pytest.raises(ValueError, match="int3"):
        export_onnx(tmp_path / "adapter", tmp_path / "out", "int3")
    assert check_export(tmp_path / "missing", "int4").startswith("not yet")


def test_builder_command_is_the_cli():
    cmd = builder_command("outputs/adapters/lora merged", "out", "int4", extra_options={"block_size": "32"})
    assert cmd == ("python -m onnxruntime_genai.models.builder -i 'outputs/adapters/lora merged' -o out -p int4 "
                   "-e cpu --extra_options block_size=32")


def test_time_tokens_measures_first_token_and_rate():
    def stream():
        for i in range(5):
            time.sleep(0.02 if i == 0 else 0.01)
            yield i

    timing = time_tokens(stream, repeats=2)
    assert timing.tokens == 5
    assert timing.first_token_s >= 0.02
    assert 20 < timing.tokens_per_s <= 100
    with pytest.raises(ValueError, match="no token"):
        time_tokens(lambda: iter([]), repeats=1)


def test_chat_session_streams_and_keeps_history():
    seen: list[list[dict]] = []

    def reply(messages):
        seen.append(list(messages))
        yield "FIX | "
        yield "item: door"

    session = ChatSession(reply, system="Answer with one ticket line.")
    partials: list[str] = []
    assert session.send("  door broken  ", on_piece=partials.append) == "FIX | item: door"
    assert partials == ["FIX | ", "FIX | item: door"]
    assert seen[0] == [{"role": "system", "content": "Answer with one ticket line."},
                       {"role": "user", "content": "door broken"}]
    session.send("and the window")
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert session.send("   ") == "" and len(seen) == 2
    session.clear()
    assert session.messages() == [{"role": "system", "content": "Answer with one ticket line."}]


def test_chat_widget_send_and_new_chat_without_a_browser():
    session = ChatSession(lambda messages: iter(["<b>FIX</b>"]))
    ui = chat_widget(session)
    ui.box.value = "door <broken>"
    ui.children[1].children[1].click()
    assert ui.box.value == ""
    assert "door &lt;broken&gt;" in ui.transcript.value and "&lt;b&gt;FIX&lt;/b&gt;" in ui.transcript.value
    assert session.history[-1] == {"role": "assistant", "content": "<b>FIX</b>"}
    ui.children[1].children[2].click()
    assert session.history == [] and ui.transcript.value == transcript_html([])


def test_model_card_is_written_from_the_inputs(tmp_path: Path):
    card = model_card(title="phi3 house-format LoRA", base="miniature Phi-3", base_details={"parameters": 749952},
                      data_card="# Data card\n\n**What.** Office requests rewritten as tickets.\n\nMore.",
                      training={"epochs": 3, "learning_rate": 0.002}, lora={"r": 8, "lora_alpha": 16, "other": 1},
                      scores={"lora": {"exact_match": 0.95, "rouge_l": 0.5}}, files=["model.onnx"],
                      intended_use="Teaching.", limits="A toy.", parity={"fp32 vs transformers": "120 of 120"})
    assert card.startswith("---\nbase_model: miniature Phi-3\n")
    for expected in ["| parameters | 749952 |", "**What.** Office requests", "| learning_rate | 0.002 |",
                     "| r | 8 |", "| lora | 0.950 | 0.500 |", "| fp32 vs transformers | 120 of 120 |",
                     "- `model.onnx`", "Teaching.", "A toy."]:
        assert expected in card
    assert "other" not in card
    assert write_model_card(tmp_path, card).read_text() == card


def test_upload_plan_and_sizes(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.json").write_text("{}")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "c").write_text("hidden")
    assert upload_plan(tmp_path) == [("a.bin", 10), ("sub/b.json", 2)]
    assert folder_size(tmp_path, "*.bin") == 10


def test_checks_and_diff_table():
    assert check_agreement(1, ["a", "b"], ["a", "c"]).startswith("right")
    assert check_agreement(2, ["a", "b"], ["a", "c"]).startswith("not yet")
    assert check_agreement(1, ["a"], ["a", "c"]).startswith("not yet")
    assert diff_table(["r0", "r1"], ["a", "b"], ["a", "c"]) == [{"#": "1", "request": "r1", "transformers": "b",
                                                                 "onnx": "c"}]


def test_lora_matmul_nodes_are_the_builders_names_and_keep_lora_float_at_int4(tiny_model_dir: Path,
                                                                               tmp_path: Path):
    """Chapter 07 exports Phi-3 Mini's switchable base at int4 with ``nodes_to_exclude=lora_matmul_nodes(...)``: the
    names must be those the builder gives LoRA's MatMuls, and excluding them must leave LoRA's matrices in float."""
    import onnx
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = base.config.num_hidden_layers
    torch.manual_seed(0)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"])).save_pretrained(
        tmp_path / "adapter")
    with_adapter = {"adapter_path": str(tmp_path / "adapter")}

    def lora_nodes(folder: Path) -> dict[str, str]:
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        return {n.name: n.op_type for n in graph.node if "/lora_" in n.name}

    fp32 = export_onnx(tiny_model_dir, tmp_path / "fp32", "fp32", extra_options=with_adapter).folder
    attention = [n for n in lora_matmul_nodes(layers) if "/attn/" in n]
    assert lora_nodes(fp32) == {name: "MatMul" for name in attention}
    assert len(lora_matmul_nodes(layers)) == layers * 7 * 2

    quantized = export_onnx(tiny_model_dir, tmp_path / "int4", "int4", extra_options=with_adapter).folder
    assert set(lora_nodes(quantized).values()) == {"MatMulNBits"}
    kept = export_onnx(tiny_model_dir, tmp_path / "int4_kept", "int4", extra_options={
        **with_adapter, "nodes_to_exclude": ",".join(lora_matmul_nodes(layers))}).folder
    assert lora_nodes(kept) == {name: "MatMul" for name in attention}
    model = onnx.load(str(kept / "model.onnx"), load_external_data=False)
    lora = [i for i in model.graph.initializer if ".lora_" in i.name]
    assert len(lora) == len(attention) and {i.data_type for i in lora} == {onnx.TensorProto.FLOAT}
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node)  # the base itself is still int4


def test_an_export_replaces_the_folder_whole(tiny_model_dir: Path, tmp_path: Path):
    """A second export into the same folder leaves none of the first one's other files (a model card written
    there afterwards), and nothing half-written beside it."""
    folder = export_onnx(tiny_model_dir, tmp_path / "fp32", "fp32").folder
    (folder / "README.md").write_text("a model card of the earlier export")
    again = export_onnx(tiny_model_dir, tmp_path / "fp32", "fp32").folder
    assert again == folder and not (folder / "README.md").exists() and (folder / "model.onnx").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".fp32")], "no staging folder left"
