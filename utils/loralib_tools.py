"""LoRA by hand with Microsoft's ``loralib``: wrap Phi-3's linear layers, save and reload the adapter, compare logits.

Chapter 02 builds the adapter with these helpers; chapter 06 rebuilds it with :func:`load_loralib_model`.
Checkpoints are safetensors only (no pickle), next to a ``loralib_config.json`` that says how to rebuild them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import loralib as lora
import torch
from torch import nn

ADAPTER_FILE = "lora_weights.safetensors"
META_FILE = "loralib_config.json"
QV_ONLY: list[bool] = [True, False, True]
DEFAULT_TARGETS: dict[str, list[bool] | None] = {"qkv_proj": QV_ONLY, "o_proj": None, "down_proj": None}


def qkv_sizes(config: Any) -> tuple[int, int, int]:
    """Rows of the q, k and v slices of Phi-3's fused ``qkv_proj`` (k and v shrink with grouped-query attention)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_attention_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


def check_equal_split(name: str, out_features: int, enable_lora: list[bool], sizes: tuple[int, ...] | None) -> None:
    """Stop with an explanation when ``MergedLinear``'s equal slices would not line up with q, k and v."""
    if sizes is not None and len(sizes) == len(enable_lora) and len(set(sizes)) > 1:
        raise ValueError(
            f"{name}: loralib's MergedLinear cuts the output into {len(enable_lora)} equal slices, but this model's "
            f"q, k, v slices have {', '.join(map(str, sizes))} rows (grouped-query attention). Adapt the whole "
            f"projection instead (targets={{'{name.rsplit('.', 1)[-1]}': None}}) or use peft.")
    if out_features % len(enable_lora):
        raise ValueError(f"{name}: {out_features} output rows cannot be cut into {len(enable_lora)} equal slices "
                         f"for enable_lora={enable_lora}.")


def lora_layer(linear: nn.Linear, r: int, alpha: int, enable_lora: list[bool] | None = None,
               dropout: float = 0.0) -> nn.Linear:
    """A ``lora.Linear`` (or ``lora.MergedLinear`` when ``enable_lora`` is given) holding ``linear``'s weights."""
    kwargs = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "fan_in_fan_out": False, "merge_weights": True,
              "bias": linear.bias is not None, "device": linear.weight.device, "dtype": linear.weight.dtype}
    if enable_lora is None:
        layer = lora.Linear(linear.in_features, linear.out_features, **kwargs)
    else:
        layer = lora.MergedLinear(linear.in_features, linear.out_features, enable_lora=list(enable_lora), **kwargs)
        index = layer.__dict__.pop("lora_ind")
        layer.register_buffer("lora_ind", index, persistent=False)  # so that .to(device) moves it too
    with torch.no_grad():
        layer.weight.copy_(linear.weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    layer.train(linear.training)  # loralib's train() returns None, not the module
    return layer


def add_lora_layers(model: nn.Module, r: int, alpha: int, targets: dict[str, list[bool] | None] | None = None,
                    dropout: float = 0.0) -> nn.Module:
    """Swap each linear layer named in ``targets`` for its loralib twin (in place, same train/eval mode); returns it."""
    targets = DEFAULT_TARGETS if targets is None else targets
    config = getattr(model, "config", None)
    found = {key: 0 for key in targets}
    for name, module in list(model.named_modules()):
        key = name.rsplit(".", 1)[-1]
        if key not in targets or not isinstance(module, nn.Linear) or isinstance(module, lora.LoRALayer):
            continue
        enable = targets[key]
        if enable is not None:
            sizes = qkv_sizes(config) if key == "qkv_proj" and config is not None else None
            check_equal_split(name, module.out_features, enable, sizes)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lora_layer(module, r, alpha, enable, dropout))
        found[key] += 1
    missing = [key for key, n in found.items() if n == 0]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no linear layer named {missing} in this model; its linear layers are {linear}")
    return model


def lora_keys(model: nn.Module) -> list[str]:
    """Names of the state-dict entries ``lora.lora_state_dict`` keeps (the ``lora_A``/``lora_B`` tensors)."""
    return list(lora.lora_state_dict(model))


def count_lora_parameters(model: nn.Module) -> dict[str, int]:
    """LoRA parameters per adapted module name (``qkv_proj``, ``o_proj``, ...), summed over the layers."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            key = name.split(".lora_")[0].rsplit(".", 1)[-1]
            counts[key] = counts.get(key, 0) + param.numel()
    return counts


def expected_lora_parameters(model: nn.Module, r: int, targets: dict[str, list[bool] | None]) -> dict[str, int]:
    """LoRA parameters the targets add, per module name: ``r·(in + out)`` per adapted layer or enabled slice."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        key = name.rsplit(".", 1)[-1]
        if key in targets and isinstance(module, nn.Linear):
            enable = targets[key]
            rows = module.out_features if enable is None else module.out_features // len(enable)
            counts[key] = counts.get(key, 0) + (1 if enable is None else sum(enable)) * r * (module.in_features + rows)
    return counts


def save_lora(model: nn.Module, folder: Path, meta: dict[str, Any], base_path: str | Path | None = None,
              tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write only the LoRA tensors (safetensors) and ``meta`` (r, alpha, targets, ...) as JSON; returns the file.

    ``tensors`` is what ``lora.lora_state_dict(model)`` returns (taken from ``model`` when not given); anything but
    ``lora_A``/``lora_B`` tensors is refused. The folder is written aside and swapped in whole (``utils.atomic``),
    with ``base_model.json`` recording the base (``base_path``, default the folder the model was loaded from) so
    that loading onto another base is caught.
    """
    from safetensors.torch import save_file

    from utils.adapters import record_base
    from utils.atomic import atomic_folder

    folder = Path(folder)
    base_path = base_path or getattr(model, "name_or_path", None)
    tensors = lora.lora_state_dict(model) if tensors is None else tensors
    other = [k for k in tensors if ".lora_A" not in k and ".lora_B" not in k]
    if other:
        raise ValueError(f"save_lora writes LoRA tensors only, but got {len(other)} others (e.g. {other[0]}): "
                         "pass lora.lora_state_dict(model), not model.state_dict()")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_folder(folder) as staging:
        save_file(tensors, str(staging / ADAPTER_FILE), metadata={"format": "pt", "library": "loralib"})
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if base_path and Path(base_path).is_dir():
            record_base(staging, base_path)
    return folder / ADAPTER_FILE


def read_meta(folder: Path) -> dict[str, Any]:
    """The ``loralib_config.json`` saved next to an adapter; names chapter 02 when it is missing."""
    path = Path(folder) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebooks/02_lora_from_scratch.ipynb first (it writes it).")
    return json.loads(path.read_text())


def pretrained_state_dict(base_path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (one file or shards) in a local folder or the hub cache."""
    from safetensors.torch import load_file

    from utils.adapters import resolve_model_folder

    folder = resolve_model_folder(base_path)  # a local folder, or the hub cache only: never the network
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors checkpoint in {folder}")
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def check_load(result: Any, allowed_missing: set[str], what: str) -> None:
    """Stop when a ``strict=False`` load left out a tensor it should have filled, or brought one it should not."""
    missing = set(result.missing_keys) - allowed_missing
    if missing or result.unexpected_keys:
        raise RuntimeError(f"loading {what}: missing {sorted(missing)[:5]}, unexpected {result.unexpected_keys[:5]}")


def load_loralib_model(base_path: str | Path, folder: Path, dtype: torch.dtype | None = None,
                       attn_implementation: str = "sdpa", allow_mismatch: bool = False) -> nn.Module:
    """Chapter 02's adapter, rebuilt the seed's way (base, then LoRA checkpoint, ``strict=False``); eval(), merged.

    Stops with ``utils.adapters.AdapterBaseMismatch`` when ``base_path`` is not the base the adapter was trained on.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from utils.adapters import check_adapter_base

    meta = read_meta(folder)
    check_adapter_base(folder, base_path, allow_mismatch)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_path), dtype=dtype or torch.float32,
                                             attn_implementation=attn_implementation)
    try:
        model.generation_config = GenerationConfig.from_pretrained(base_path)
    except OSError:
        pass
    add_lora_layers(model, meta["r"], meta["lora_alpha"], meta["targets"])
    model.train()
    keys = set(lora_keys(model))
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    check_load(model.load_state_dict(pretrained_state_dict(base_path), strict=False), keys | tied, "the base model")
    from safetensors.torch import load_file

    adapter = load_file(str(Path(folder) / ADAPTER_FILE))
    check_load(model.load_state_dict(adapter, strict=False), set(model.state_dict()) - keys, "the LoRA adapter")
    if set(adapter) != keys:
        raise RuntimeError(f"the adapter in {folder} does not match {META_FILE}: {sorted(keys ^ set(adapter))[:5]}")
    model.tie_weights()
    lora.mark_only_lora_as_trainable(model)
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a tokenized batch as float32, without changing train/eval mode (or merging)."""
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device),
                 attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()


def max_logit_diff(a: nn.Module | torch.Tensor, b: nn.Module | torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two models' (or precomputed) logits on the batch's real tokens."""
    la = a if isinstance(a, torch.Tensor) else logits(a, batch)
    lb = b if isinstance(b, torch.Tensor) else logits(b, batch)
    real = batch["attention_mask"].bool()
    return (la - lb).abs()[real].max().item()


def delta_weight(layer: nn.Module) -> torch.Tensor:
    """The update ``(alpha/r)·B·A`` a loralib layer adds to its frozen weight (zero-padded for ``MergedLinear``)."""
    with torch.no_grad():
        if isinstance(layer, lora.MergedLinear):
            return layer.merge_AB() * layer.scaling
        return layer.lora_B @ layer.lora_A * layer.scaling


def lora_factors_figure(layer: nn.Module, title: str, crop: int = 32) -> Any:
    """Heat maps of a ``lora.Linear``'s frozen W, factors A, B and update (alpha/r)·B·A (``crop`` rows/cols)."""
    import matplotlib.pyplot as plt

    mats = {"W (frozen)": layer.weight, "A (r × in)": layer.lora_A, "B (out × r)": layer.lora_B,
            "ΔW = (α/r)·B·A": delta_weight(layer)}
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.8), gridspec_kw={"width_ratios": [4, 4, 1.5, 4]})
    for ax, (name, mat) in zip(axes, mats.items()):
        m = mat.detach().float().cpu()
        limit = max(m.abs().max().item(), 1e-8)
        ax.imshow(m[:crop, :crop], cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
        ax.set_title(f"{name}\n{tuple(m.shape)}, max |·| {m.abs().max().item():.2g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title} (first {crop} rows and columns shown)", fontsize=10)
    fig.tight_layout()
    return fig
