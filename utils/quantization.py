"""QLoRA helpers: the 4-bit NF4 config, measured memory, a training callback that keeps QLoRA honest, and merging.

Two CPU-only traps this module works around (chapter 04 applies both in one cell, only on a CPU; docs/BUILD_NOTES.md
has the evidence). On a GPU neither applies and chapter 04 runs the plain recipe.

- On a CPU with AVX512-BF16, bitsandbytes silently repacks a 4-bit layer's weights for fast inference the first time
  it runs in eval mode without gradients. From then on every call, training included, goes through a bf16 kernel
  that has no backward pass: gradients stop flowing through the frozen 4-bit layers and QLoRA stalls
  (``keep_4bit_layers_trainable``). peft's 4-bit merge also misreads the repacked layout
  (``repack_for_cpu_inference`` reproduces that state on any CPU).
- TRL's ``SFTTrainer`` casts the LoRA weights of a quantized model to bf16, the QLoRA paper's choice for bf16 GPUs.
  A CPU run computes in fp32, and with bf16's 8-bit mantissa most late, small optimizer updates round away to
  nothing (``cast_trainable`` after building the trainer, or the ``qlora_precision`` callback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.models import Hardware, hardware_report, load_model


def bnb_config(hardware: Hardware | None = None) -> Any:
    """QLoRA's quantization: 4-bit NF4 weights, double-quantized scales, matmuls in the hardware's dtype."""
    from transformers import BitsAndBytesConfig

    hw = hardware or hardware_report()
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=hw.dtype)


def nf4_levels() -> torch.Tensor:
    """The 16 values a 4-bit NF4 code can stand for (in units of a block's absolute maximum), from bitsandbytes."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device="cpu").float()


def scaled_blocks(weight: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """The weight's values divided by the absolute maximum of their block of ``blocksize``, as NF4 sees them."""
    blocks = weight.detach().float().cpu().reshape(-1, blocksize)
    return (blocks / blocks.abs().amax(dim=1, keepdim=True)).flatten()


def roundtrip_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                   double_quant: bool = True) -> torch.Tensor:
    """The weight after a trip through bitsandbytes' 4-bit format (quantize, then dequantize), in the weight's dtype."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(weight.detach(), blocksize=blocksize, compress_statistics=double_quant,
                                  quant_type=quant_type)
    return dequantize_4bit(packed, state).to(weight.dtype)


def scale_bits_per_weight(layer: torch.nn.Module) -> float:
    """Bits a 4-bit layer spends on its block scales per weight (0.5 with fp32 scales, ~0.13 double-quantized)."""
    state, bits = layer.weight.quant_state, 0
    while state is not None:
        bits += state.absmax.numel() * state.absmax.element_size() * 8
        state = getattr(state, "state2", None)
    return bits / layer.weight.quant_state.shape.numel()


def is_4bit_layer(module: torch.nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` (also when peft has wrapped it in a LoRA layer's ``base_layer``)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def _part(name: str, module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.Embedding) or name.endswith("lm_head"):
        return "embeddings and lm_head"
    if isinstance(module, torch.nn.Linear) or is_4bit_layer(module):
        return "linear layers"
    return "norms and other"


def memory_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Bytes actually held by each part of the model: linear layers, embeddings and lm_head, norms and other.

    Counts parameters, buffers and, beside each 4-bit weight, its quantization state (block scales, codebooks),
    which ``get_memory_footprint`` leaves out. Each storage is counted once (shared tensors are not double-counted).
    """
    seen: set[int] = set()
    parts: dict[str, int] = {}
    for name, module in model.named_modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None))
                        if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                part = _part(name, module)
                parts[part] = parts.get(part, 0) + storage.nbytes()
    return parts


def storage_bytes(model: torch.nn.Module) -> int:
    """Total bytes actually held by the model's tensors, quantization state included (see :func:`memory_breakdown`)."""
    return sum(memory_breakdown(model).values())


def keep_4bit_layers_trainable(model: torch.nn.Module) -> int:
    """Stop bitsandbytes' CPU inference repacking on every 4-bit layer (undoing it where done); returns layers touched.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weights the first time it runs in eval mode without
    gradients, then computes in bf16 with no backward pass, whatever the compute dtype. Fine for inference only;
    fatal for training afterwards. With the flag off, every call dequantizes to the compute dtype as in training.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    touched = 0
    for module in model.modules():
        if not is_4bit_layer(module):
            continue
        weight = module.weight
        packed = getattr(weight.quant_state, "packing_format_for_cpu", False)
        touched += bool(getattr(module, "support_avx512bf16_for_cpu", False) or packed)
        module.support_avx512bf16_for_cpu = False
        if packed:
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return touched


def repack_for_cpu_inference(model: torch.nn.Module) -> int:
    """Repack every 4-bit layer as bitsandbytes does on a CPU with AVX512-BF16 at its first evaluation; returns layers.

    Reproduces, on any machine, the state a CPU evaluation leaves behind, so that what it breaks can be shown
    everywhere: peft's ``merge_and_unload`` on such a model reads the repacked codes and the transposed bf16 block
    scales as if they were in the standard layout, and merges into scrambled weights. Only the layout changes here
    (pure torch); nothing is computed with the repacked weights.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    repacked = 0
    for module in model.modules():
        if is_4bit_layer(module) and not getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu(module.weight.data,
                                                                                           module.weight.quant_state)
            repacked += 1
    return repacked


def cpu_packed_layers(model: torch.nn.Module) -> int:
    """How many 4-bit layers bitsandbytes has repacked for CPU inference (0 once ``keep_4bit_layers_trainable`` ran)."""
    return sum(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in model.modules() if is_4bit_layer(m))


def input_gradient_norm(model: Any, tokenizer: Any, conversations: list[list[dict]]) -> float:
    """Norm of the loss's gradient with respect to the input embeddings: what backpropagation gets through the model."""
    enc = tokenizer.apply_chat_template(conversations, return_dict=True, padding=True, return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}
    embeds = model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_()
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    model(inputs_embeds=embeds, attention_mask=enc["attention_mask"], labels=labels).loss.backward()
    return embeds.grad.float().norm().item()


def load_4bit_model(path: str | None = None, hardware: Hardware | None = None, training: bool = False) -> Any:
    """The configured model loaded with :func:`bnb_config`, its 4-bit layers kept trainable (see above)."""
    hw = hardware or hardware_report()
    model = load_model(path, hardware=hw, training=training, quantization_config=bnb_config(hw))
    keep_4bit_layers_trainable(model)
    return model


def trainable_dtypes(model: torch.nn.Module) -> list[str]:
    """The distinct dtypes of the parameters that will be trained, e.g. ``['float32']``."""
    return sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad})


def cast_trainable(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Cast the parameters that will be trained (the adapter) to ``dtype``; returns their dtypes before the cast.

    Call it after ``SFTTrainer(...)`` and before ``train()``: the optimizer is created by ``train()``, so its state
    follows the new dtype.
    """
    before = trainable_dtypes(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return before


def qlora_precision(adapter_dtype: torch.dtype | None = torch.float32, keep_trainable: bool = True) -> Any:
    """A ``TrainerCallback`` that, once the trainer is built, sets the adapter's dtype and keeps 4-bit layers trainable.

    ``adapter_dtype=None`` leaves TRL's choice (bf16 for quantized models); ``keep_trainable=False`` leaves
    bitsandbytes' CPU repacking alone. Both knobs exist to reproduce chapter 04's comparison. The callback records
    ``dtypes_from_trl`` (what ``SFTTrainer`` left) and ``dtypes`` (what training uses).
    """
    from transformers import TrainerCallback

    class QLoRAPrecision(TrainerCallback):
        def __init__(self) -> None:
            self.dtypes_from_trl: list[str] = []
            self.dtypes: list[str] = []

        def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
            self.dtypes_from_trl = trainable_dtypes(model)
            if keep_trainable:
                keep_4bit_layers_trainable(model)
            if adapter_dtype is not None:
                cast_trainable(model, adapter_dtype)
            self.dtypes = trainable_dtypes(model)
            return control

    return QLoRAPrecision()


def update_counter() -> Any:
    """A ``TrainerCallback`` recording, per optimizer step, the fraction of trainable values the step left unchanged."""
    from transformers import TrainerCallback

    class UpdateCounter(TrainerCallback):
        def __init__(self) -> None:
            self.unchanged: list[float] = []
            self._model: Any = None
            self._before: list[torch.Tensor] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
            self._model = model
            return control

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self._before = [p.detach().clone() for p in self._model.parameters() if p.requires_grad]
            return control

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            after = [p.detach() for p in self._model.parameters() if p.requires_grad]
            same = sum(int((a == b).sum()) for a, b in zip(self._before, after))
            self.unchanged.append(same / max(sum(p.numel() for p in after), 1))
            self._before = []
            return control

        def last_quarter(self) -> float:
            """Mean fraction of values left unchanged over the last quarter of the steps."""
            tail = self.unchanged[-max(len(self.unchanged) // 4, 1):]
            return sum(tail) / max(len(tail), 1)

    return UpdateCounter()


@torch.inference_mode()
def logits_on(model: Any, tokenizer: Any, conversations: list[list[dict]], batch_size: int = 32) -> torch.Tensor:
    """fp32 logits of the model on the rendered conversations, real (non-padding) tokens only, concatenated."""
    model.eval()
    out = []
    for start in range(0, len(conversations), batch_size):
        enc = tokenizer.apply_chat_template(conversations[start:start + batch_size], return_dict=True,
                                            padding=True, return_tensors="pt")
        mask = enc["attention_mask"].bool()
        logits = model(input_ids=enc["input_ids"].to(model.device),
                       attention_mask=enc["attention_mask"].to(model.device)).logits.float().cpu()
        out.append(logits[mask])
    return torch.cat(out)


def max_logit_diff(model_a: Any, model_b: Any, tokenizer: Any, conversations: list[list[dict]]) -> float:
    """Largest absolute difference between two models' logits over every real token of the conversations.

    Either model may be given as a loader (a function of no arguments returning it): it is loaded, measured and freed
    before the other is loaded, so that comparing two large models never holds both in memory.
    """
    from utils.models import release_memory

    def logits(model: Any) -> torch.Tensor:
        if isinstance(model, torch.nn.Module):
            return logits_on(model, tokenizer, conversations)
        loaded = model()
        values = logits_on(loaded, tokenizer, conversations)
        del loaded
        release_memory()
        return values

    return (logits(model_a) - logits(model_b)).abs().max().item()


def load_adapter(adapter_dir: Path, base_path: str | None = None, quantized: bool = False,
                 hardware: Hardware | None = None, allow_mismatch: bool = False) -> Any:
    """A saved LoRA adapter on its base, in the hardware's dtype (fp32 on CPU) or, with ``quantized``, in 4-bit NF4.

    Stops with ``utils.adapters.AdapterBaseMismatch`` before loading when ``base_path`` is not the base the adapter
    was trained on (``allow_mismatch=True`` loads it anyway, with a warning).
    """
    from peft import PeftModel

    from utils.adapters import check_adapter_base
    from utils.models import require_miniature_or_model

    base_path = base_path or require_miniature_or_model()
    check_adapter_base(adapter_dir, base_path, allow_mismatch)
    hw = hardware or hardware_report()
    base = load_4bit_model(base_path, hw) if quantized else load_model(base_path, hardware=hw)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def full_precision_base(base_path: str | None = None, dequantized: bool = False,
                        dtype: torch.dtype = torch.float32) -> Any:
    """The base in ``dtype``: its original weights, or with ``dequantized`` the NF4 weights QLoRA trained against."""
    if not dequantized:
        return load_model(base_path, dtype=dtype)
    from dataclasses import replace

    return load_4bit_model(base_path, replace(hardware_report(), dtype=dtype)).dequantize(dtype=dtype)


def merge_adapter_into_full_precision(base_path: str | None, adapter_dir: Path, out_dir: Path,
                                      dequantized: bool = False, dtype: torch.dtype | None = None,
                                      allow_mismatch: bool = False) -> Path:
    """Merge a LoRA/QLoRA adapter into the base reloaded in full precision; save model and tokenizer to ``out_dir``.

    ``dtype`` defaults to the training dtype of the hardware report (fp32 on a CPU, bf16 or fp16 on a GPU): a merged
    Phi-3 Mini saved in fp32 would take 15 GB where bf16 takes 7.6.

    ``dequantized=True`` merges into the NF4 weights the QLoRA adapter was trained against (reproduces the trained
    model exactly); the default merges into the original weights (for LoRA adapters, and the common QLoRA
    practice). Merging into the 4-bit model instead re-quantizes ``W + B·A`` to NF4. The merged model needs
    neither peft nor bitsandbytes to load.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    from utils.adapters import check_adapter_base
    from utils.atomic import atomic_folder
    from utils.models import require_miniature_or_model

    base_path = base_path or require_miniature_or_model()
    check_adapter_base(adapter_dir, base_path, allow_mismatch)
    base = full_precision_base(base_path, dequantized, dtype or hardware_report().dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base_path
    with atomic_folder(out_dir) as staging:  # an interrupted save leaves the previous merged model, never half of one
        merged.save_pretrained(str(staging))
        AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(staging))
    return Path(out_dir)
