"""A Phi-3-Mini-shaped stand-in: Phi-3-mini-4k-instruct's real shape and tokenizer layout, random weights, few layers.

The real-model path (``PHI3_MODEL_ID=microsoft/Phi-3-mini-4k-instruct``) cannot be downloaded here, yet it must be
run somewhere before a learner with a GPU runs it. The stand-in has everything of Phi-3 Mini that the chapters'
code depends on, except its knowledge and its depth:

- the model: ``Phi3ForCausalLM`` with the published configuration (hidden 3072, 32 heads, 32 key/value heads,
  intermediate 8192, vocabulary 32,064 rows, rope theta 10,000, context 4,096, sliding window 2,047), ``layers``
  decoder layers (2 by default instead of 32), randomly initialised, saved in bf16 as the hub's checkpoint is;
- the tokenizer: a SentencePiece-style BPE (``▁`` for spaces, byte fallback) trained here on the project's own
  text, with ``<unk>``/``<s>``/``</s>`` at 0/1/2, Phi-3's eleven added tokens at their real ids 32,000-32,010 and
  their real strip settings (``rstrip=True`` on the chat tokens, so ``<|assistant|>\\n`` tokenizes to one token), the
  hub's chat template, and a generation config stopping at ``<|endoftext|>``, ``<|assistant|>`` and ``<|end|>``;
  its base vocabulary also as a SentencePiece ``tokenizer.model``, as the hub ships it (llama.cpp's converter reads it).

    python -m utils.standin --layers 2      # builds into outputs/standin/phi3-mini-shape-2-layers (~1 minute)

``tests/test_real_shape.py`` runs every chapter on it (``PHI3_MODEL_ID`` pointing at the folder, short-run
settings); ``bench/memory_by_depth.py`` runs chapters on stand-ins of two depths to estimate the real model's memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from utils import config

PHI3_MINI_CONFIG: dict[str, Any] = {  # microsoft/Phi-3-mini-4k-instruct config.json
    "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096, "sliding_window": 2047, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
}
PHI3_MINI_LAYERS = 32
BASE_VOCABULARY = 32000  # Llama's SentencePiece vocabulary, which Phi-3 Mini's tokenizer extends

# Phi-3 Mini's added tokens (tokenizer.json "added_tokens"): id -> (content, rstrip)
PHI3_ADDED_TOKENS: dict[int, tuple[str, bool]] = {
    32000: ("<|endoftext|>", False), 32001: ("<|assistant|>", True), 32002: ("<|placeholder1|>", True),
    32003: ("<|placeholder2|>", True), 32004: ("<|placeholder3|>", True), 32005: ("<|placeholder4|>", True),
    32006: ("<|system|>", True), 32007: ("<|end|>", True), 32008: ("<|placeholder5|>", True),
    32009: ("<|placeholder6|>", True), 32010: ("<|user|>", True),
}
# The chat template in microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json
PHI3_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
    "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
GENERATION_EOS = [32000, 32001, 32007]  # generation_config.json: <|endoftext|>, <|assistant|>, <|end|>


def standin_dir(layers: int) -> Path:
    """Where ``build_standin`` puts a stand-in of ``layers`` layers: ``OUTPUTS/standin/phi3-mini-shape-N-layers``."""
    return config.outputs_dir() / "standin" / f"phi3-mini-shape-{layers}-layers"


def tokenizer_texts() -> list[str]:
    """Text to train the stand-in's tokenizer on: the project's conversations and the miniature's corpus."""
    from utils.skills import general_skills_corpus

    texts = []
    for path in (config.DATASET_TRAIN, config.DATASET_TEST):
        for line in path.read_text().splitlines():
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    texts.extend(m["content"] for row in general_skills_corpus(4000, seed=0) for m in row["messages"])
    return texts


def train_phi3_like_tokenizer(texts: list[str]) -> Any:
    """A Llama-style BPE (``▁`` spaces, byte fallback, 32,000 base entries) with Phi-3 Mini's added tokens.

    The corpus is far too small for 32,000 merges, so the base vocabulary is filled up with unreachable
    ``<|unused_N|>`` entries: what matters for the chapters is the vocabulary's size and where the special tokens sit.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    fixed = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Training only: merges stay inside a word and never join a digit or a punctuation mark to anything, as in
    # Llama's SentencePiece vocabulary (split_digits, split_by_unicode_script). ONNX Runtime GenAI's tokenizer
    # relies on that and splits a merged "4," or "broken," differently from transformers (chapter 07's parity).
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation(behavior="isolated")])
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCABULARY, special_tokens=fixed, show_progress=False,
                                  max_token_length=16)
    bpe.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(bpe.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    for n in range(BASE_VOCABULARY - len(vocab)):
        vocab[f"<|unused_{n}|>"] = len(vocab)
    spec["model"]["vocab"] = vocab
    spec["pre_tokenizer"] = None  # Llama's tokenizer.json: normalizer prepends ▁ and replaces spaces
    spec["decoder"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    for token_id, (content, rstrip) in sorted(PHI3_ADDED_TOKENS.items()):
        tok.add_special_tokens([AddedToken(content, rstrip=rstrip, lstrip=False, normalized=False, special=True)])
        assert tok.token_to_id(content) == token_id, (content, tok.token_to_id(content))
    return LlamaTokenizer(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
        pad_token="<|endoftext|>", chat_template=PHI3_MINI_CHAT_TEMPLATE, model_max_length=4096,
        padding_side="left", add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)


def sentencepiece_model(tokenizer: Any) -> bytes:
    """The stand-in's base vocabulary as a SentencePiece BPE model: the ``tokenizer.model`` Phi-3 Mini ships beside
    its tokenizer.json, which llama.cpp's Phi-3 converter reads (chapter 07).

    Every piece keeps its id; a piece's score is minus its id (the order in which BPE training made it); ``<unk>``,
    ``<s>``/``</s>``, the byte pieces and the unreachable fillers get SentencePiece's types for them. Phi-3's added
    tokens stay in tokenizer.json, where the converter reads them.
    """
    import re

    from sentencepiece import sentencepiece_model_pb2 as spm

    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    model = spm.ModelProto()
    model.trainer_spec.model_type = spm.TrainerSpec.BPE
    model.trainer_spec.vocab_size = len(vocab)
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.split_digits = True
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    kind = spm.ModelProto.SentencePiece
    for piece, index in sorted(vocab.items(), key=lambda item: item[1]):
        entry = model.pieces.add(piece=piece, score=-float(index))
        entry.type = (kind.UNKNOWN if piece == "<unk>" else kind.CONTROL if piece in ("<s>", "</s>")
                      else kind.BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", piece)
                      else kind.UNUSED if piece.startswith("<|unused_") else kind.NORMAL)
    return model.SerializeToString()


def build_standin(out: Path, layers: int = 2, seed: int = 0) -> Path:
    """Build and save the stand-in (tokenizer, bf16 weights, generation config) into ``out``; returns ``out``."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    from utils.atomic import atomic_folder

    tokenizer = train_phi3_like_tokenizer(tokenizer_texts())
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: 32 layers built in fp32 would need 15 GB more
    try:
        model = Phi3ForCausalLM(Phi3Config(**{**PHI3_MINI_CONFIG, "num_hidden_layers": layers}))
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=GENERATION_EOS, pad_token_id=32000)
    with atomic_folder(out) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "tokenizer.model").write_bytes(sentencepiece_model(tokenizer))
        (folder / "standin.json").write_text(json.dumps({
            "what": "Phi-3-mini-4k-instruct's shape and tokenizer layout, random weights (utils/standin.py)",
            "layers": layers, "seed": seed, "parameters": model.num_parameters()}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Phi-3 Mini has 32)")
    parser.add_argument("--out", type=Path, default=None, help="folder (default: outputs/standin/...)")
    args = parser.parse_args(argv)
    out = build_standin(args.out or standin_dir(args.layers), args.layers)
    print(out)


if __name__ == "__main__":
    main()
