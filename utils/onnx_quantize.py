"""The ONNX Runtime GenAI builder's int4/int8 step, one weight at a time (a library workaround, not the lesson).

The builder quantizes an export by serializing the *whole* graph with its weights in the graph's float type (fp32
for a CPU export) and handing that to ONNX Runtime's ``MatMulNBitsQuantizer``. For Phi-3 Mini that is a 15 GB copy
on top of the loaded 16-bit model (7.6 GB): about 24 GiB of host RAM, twice a free Colab's. Here the same quantizer
(``DefaultWeightOnlyQuantizer.quantize``, so the same code computes every byte) is given one ``MatMul`` and its one
weight at a time; the fp32 copy of that weight is dropped as soon as its int4 blocks exist, and everything left is
written by the builder's own lazy save. The result is the builder's file, node for node and byte for byte
(``tests/test_onnx_quantize.py`` compares both on the miniature); ``bench/export_memory.py`` measures the memory.

Only the builder's default path is streamed (the DEFAULT quantizer with one bit width into ``MatMulNBits``, no
per-node overrides, no QDQ format, no CUDA prepacking); any other setting runs the builder's own method unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def _streamable(builder: Any) -> bool:
    """Whether ``builder``'s settings are the default path this module reproduces exactly."""
    import onnx_ir as ir

    return (getattr(builder, "quantization_algo", "default") == "default"
            and not builder.quant_attrs["use_qdq"]
            and not getattr(builder, "int4_customized_weight_config", None)
            and not getattr(builder, "exact_quant_override_names", None)
            and not getattr(builder, "exact_quant_overrides", None)
            and not (builder.ep == "cuda" and getattr(builder, "matmul_attrs", {}).get("weights_prepacked", 0) > 0)
            and set(builder.quant_attrs["op_types_to_quantize"] or ("MatMul",)) <= {"MatMul"}
            and not any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                        for node in builder.model.graph.all_nodes() for attr in node.attributes.values()))


def quantize_weights_one_at_a_time(builder: Any) -> Any:
    """``builder.to_nbits()`` with at most one weight in float form in memory at a time; returns the ``ir.Model``.

    For each ``MatMul`` with a constant weight (not in ``nodes_to_exclude``), a one-node ONNX graph holding just that
    weight goes through ONNX Runtime's quantizer, and its nodes and initializers replace the original in the builder's
    graph. Weights still waiting are the builder's lazy tensors: they exist in float form only while quantized.
    """
    import onnx
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)
    from onnxruntime.quantization.quant_utils import QuantFormat

    attrs = builder.quant_attrs
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=attrs["matmul_block_size"], is_symmetric=attrs["is_symmetric"],
        accuracy_level=attrs["accuracy_level"], quant_format=QuantFormat.QOperator,
        op_types_to_quantize=attrs["op_types_to_quantize"], bits=attrs["bits"]))
    exclude = set(attrs["nodes_to_exclude"])
    model = builder.model
    graph = model.graph
    model.opset_imports["com.microsoft"] = 1  # MatMulNBits' domain

    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.name in exclude:
            continue
        weight = node.inputs[1]
        if weight is None or weight.const_value is None or not weight.is_initializer():
            continue
        if len(weight.const_value.shape) != 2:  # the builder's weights are 2-D; N-D ones need the whole graph's ranks
            continue
        proto = ir.serde.serialize_node(node)
        one = onnx.helper.make_graph([proto], "one_matmul", inputs=[], outputs=[],
                                     initializer=[ir.serde.serialize_tensor(weight.const_value)])
        new_protos = quantizer.quantize(proto, [one])
        if len(new_protos) == 1 and new_protos[0] is proto:
            continue  # the quantizer declined this node
        values = {value.name: value for value in node.inputs if value is not None}
        for tensor in one.initializer:
            if tensor.name != weight.name:
                own = onnx.TensorProto()
                own.CopyFrom(tensor)  # a tensor read from `one` would keep all of `one`, fp32 weight included, alive
                data = ir.serde.deserialize_tensor(own)
                value = ir.Value(name=tensor.name, const_value=data, type=ir.TensorType(data.dtype), shape=data.shape)
                graph.register_initializer(value)
                values[tensor.name] = value
        new_nodes = []
        for new in new_protos:
            created = ir.Node(new.domain, new.op_type, [values[name] if name else None for name in new.input],
                              [ir.serde.deserialize_attribute(a) for a in new.attribute],
                              num_outputs=len(new.output), name=new.name)
            for value, name in zip(created.outputs, new.output):
                value.name = name
                values[name] = value
            new_nodes.append(created)
        old = node.outputs[0]  # replace_nodes_and_values gives its name, type and shape to the new output
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [old], [values[old.name]])
        if not weight.uses() and weight not in graph.outputs:
            graph.initializers.pop(weight.name)  # its float copy and the torch tensor behind it can go now
    return model


@contextlib.contextmanager
def builder_quantizes_one_weight_at_a_time() -> Iterator[None]:
    """While active, the ONNX Runtime GenAI builder quantizes with :func:`quantize_weights_one_at_a_time`."""
    import sys

    import onnxruntime_genai.models.builder  # noqa: F401  (puts its folder on sys.path: its classes are builders.*)

    classes = {module.Model for name in ("builders.base", "onnxruntime_genai.models.builders.base")
               if (module := sys.modules.get(name)) is not None}
    originals = {cls: cls.to_nbits for cls in classes}

    def patched(original: Any) -> Any:
        def to_nbits(self: Any) -> Any:
            return quantize_weights_one_at_a_time(self) if _streamable(self) else original(self)
        return to_nbits

    for cls, original in originals.items():
        cls.to_nbits = patched(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.to_nbits = original
