"""utils.onnx_quantize: the builder's int4 step one weight at a time writes the builder's own files, byte for byte."""

from __future__ import annotations

import filecmp
from pathlib import Path
from types import SimpleNamespace

import pytest

from utils import onnx_quantize
from utils.deployment import export_onnx, lora_matmul_nodes


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "down_proj"])
                   ).save_pretrained(folder)
    return folder


def same_files(left: Path, right: Path) -> list[str]:
    """The names of the files that differ (or exist on one side only) between two export folders."""
    names = {p.name for p in left.iterdir()} | {p.name for p in right.iterdir()}
    return sorted(n for n in names if not ((left / n).is_file() and (right / n).is_file()
                                           and filecmp.cmp(left / n, right / n, shallow=False)))


@pytest.mark.parametrize("precision, with_adapter", [("int4", False), ("int4", True), ("int8", False)],
                         ids=["int4 merged model", "int4 base + adapter, LoRA kept float", "int8 merged model"])
def test_one_weight_at_a_time_writes_the_builders_own_files(tiny_model_dir: Path, lora_adapter: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             precision: str, with_adapter: bool):
    import onnx

    layers = 2
    options = ({"adapter_path": str(lora_adapter), "nodes_to_exclude": ",".join(lora_matmul_nodes(layers))}
               if with_adapter else None)
    own = export_onnx(tiny_model_dir, tmp_path / "own", precision, extra_options=options,
                      one_weight_at_a_time=False).folder

    streamed_calls = []
    original = onnx_quantize.quantize_weights_one_at_a_time
    monkeypatch.setattr(onnx_quantize, "quantize_weights_one_at_a_time",
                        lambda builder: streamed_calls.append(builder) or original(builder))
    streamed = export_onnx(tiny_model_dir, tmp_path / "streamed", precision, extra_options=options).folder

    assert len(streamed_calls) == 1  # the builder really took this path, not its own
    assert same_files(own, streamed) == []
    graph = onnx.load(str(streamed / "model.onnx"), load_external_data=False).graph
    per_layer = 7 if with_adapter else 5  # with an adapter the builder splits qkv_proj and gate_up_proj
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == layers * per_layer + 1  # and lm_head
    if with_adapter:
        assert {n.op_type for n in graph.node if "/lora_" in n.name} == {"MatMul"}


def test_no_whole_graph_copy_is_made(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The builder's own step starts with ``ir.to_proto(model)``, the whole graph with fp32 weights: not here."""
    import onnx_ir

    def whole_graph(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole graph was serialized")

    monkeypatch.setattr(onnx_ir, "to_proto", whole_graph)
    export_onnx(tiny_model_dir, tmp_path / "streamed", "int4")
    with pytest.raises(RuntimeError, match="the whole graph was serialized"):
        export_onnx(tiny_model_dir, tmp_path / "own", "int4", one_weight_at_a_time=False)


def fake_builder(**changes: object) -> SimpleNamespace:
    settings = {"quantization_algo": "default", "int4_customized_weight_config": {}, "exact_quant_override_names": set(),
                "exact_quant_overrides": {}, "ep": "cpu", "matmul_attrs": {"weights_prepacked": 0},
                "quant_attrs": {"op_types_to_quantize": ("MatMul",), "use_qdq": False},
                "model": SimpleNamespace(graph=SimpleNamespace(all_nodes=lambda: []))}
    return SimpleNamespace(**{**settings, **changes})


@pytest.mark.parametrize("changes", [
    {"quantization_algo": "k_quant"},
    {"int4_customized_weight_config": {"/lm_head/MatMul": {"bits": 8}}},
    {"exact_quant_override_names": {"/lm_head/MatMul"}},
    {"ep": "cuda", "matmul_attrs": {"weights_prepacked": 1}},
    {"quant_attrs": {"op_types_to_quantize": ("MatMul", "Gather"), "use_qdq": False}},
    {"quant_attrs": {"op_types_to_quantize": ("MatMul",), "use_qdq": True}},
], ids=["k_quant", "per-node bits", "exact overrides", "cuda prepacking", "embeddings too", "QDQ format"])
def test_settings_it_does_not_reproduce_are_left_to_the_builder(changes: dict[str, object]):
    assert onnx_quantize._streamable(fake_builder())
    assert not onnx_quantize._streamable(fake_builder(**changes))
