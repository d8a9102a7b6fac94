"""The miniature Phi-3: real architecture and names, Phi-3's tokens and template, stops at <|end|>."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3ForCausalLM

from utils.miniature import load_report
from utils.prompts import END, ENDOFTEXT, PHI3_SPECIAL_TOKENS, phi3_chat_template

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: 1 2 3"},
        {"role": "assistant", "content": "3 2 1"}]


def test_loads_through_from_pretrained_with_phi3_module_names(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(model, Phi3ForCausalLM)
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} <= names
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert (tiny_model_dir / "model.safetensors").exists()


def test_tokenizer_has_phi3_tokens_template_and_digit_splitting(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for token in PHI3_SPECIAL_TOKENS:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    assert tok.chat_template == phi3_chat_template()
    assert tok.apply_chat_template(CHAT, tokenize=False) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nReverse: 1 2 3<|end|>\n<|assistant|>\n3 2 1<|end|>\n"
        + ENDOFTEXT)
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and ENDOFTEXT not in prompt
    assert tok.tokenize("2024") == ["▁", "2", "0", "2", "4"]  # as Phi-3's: a dummy "▁" prefix, digits one by one
    assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]


def test_tokenizer_reads_text_as_its_sentencepiece_model_does(tiny_model_dir: Path) -> None:
    """The shipped tokenizer.model (what llama.cpp's converter reads) and tokenizer.json agree token for token: each
    piece of text between special tokens is encoded by SentencePiece with its dummy "▁" prefix, as llama.cpp does."""
    import re

    import sentencepiece as spm

    from utils.miniature import PHI3_ADDED_TOKENS

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    assert sp.vocab_size() == tok.convert_tokens_to_ids(PHI3_ADDED_TOKENS[0])
    assert tok.convert_tokens_to_ids(PHI3_ADDED_TOKENS) == list(range(sp.vocab_size(), sp.vocab_size() + 11))
    text = tok.apply_chat_template(CHAT + [{"role": "user", "content": "Größe: 12,5 m²?  ok"}], tokenize=False)
    expected: list[int] = []
    previous = ""
    for part in re.split("(" + "|".join(map(re.escape, PHI3_ADDED_TOKENS)) + ")", text):
        if part in PHI3_ADDED_TOKENS:
            expected.append(tok.convert_tokens_to_ids(part))
        elif previous not in ("", ENDOFTEXT):  # Phi-3's added tokens strip the whitespace after them
            part = part.lstrip()
        if part and part not in PHI3_ADDED_TOKENS:
            expected += sp.encode(part)
        previous = part
    assert tok(text, add_special_tokens=False)["input_ids"] == expected
    assert tok.decode(expected, skip_special_tokens=True).endswith("Größe: 12,5 m²?  ok")


def test_generation_stops_at_end_token(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tok.convert_tokens_to_ids(END) in model.generation_config.eos_token_id
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.convert_tokens_to_ids(END)] = 1.0
    ids = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 1


def test_report_shows_pretraining_helped(tiny_model_dir: Path) -> None:
    report = load_report(tiny_model_dir)
    assert report["heldout_before"]["exact_match"] == 0.0
    assert report["heldout_after"]["heldout_loss"] < report["heldout_before"]["heldout_loss"]
    assert 0 < report["parameters"] < 1_000_000


def test_loss_mask_covers_assistant_answers_and_their_end_token(tiny_model_dir: Path) -> None:
    from utils.prompts import assistant_mask, show_loss_mask

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    shown = show_loss_mask(tok, CHAT)
    # Phi-3's added tokens swallow the template's newline after them (rstrip); the text after each starts with "▁".
    assert "<|assistant|>⟦ 3 2 1<|end|><|endoftext|>⟧" in shown and shown.count("⟦") == 1
    assert "Reverse" not in shown.split("⟦")[1]
    tokens, mask = assistant_mask(tok, CHAT)
    assert len(tokens) == len(mask) and 0 < sum(mask) < len(mask)


def test_reading_check_adds_rounds_only_while_a_kind_is_missed(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``read_every_kind`` trains more only below the threshold, at most ``extra_rounds`` times, and reports it."""
    from dataclasses import replace

    from utils.miniature import TINY_SPEC, read_every_kind, tagging_per_kind
    from utils.skills import TAG_ORDER

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    first = tagging_per_kind(model, tokenizer)
    assert set(first) == set(TAG_ORDER) and all(0 <= v <= 1 for v in first.values())

    weights = [p.detach().clone() for p in model.parameters()]
    kinds, rounds = read_every_kind(model, tokenizer, replace(TINY_SPEC, min_kind_accuracy=0.0, extra_rounds=2),
                                    exclude=set(), output_dir=tmp_path, progress=False)
    assert rounds == [] and kinds == first
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))

    spec = replace(TINY_SPEC, pretrain_examples=64, min_kind_accuracy=1.01, extra_rounds=2)  # never satisfied
    kinds, rounds = read_every_kind(model, tokenizer, spec, exclude=set(), output_dir=tmp_path, progress=False)
    assert len(rounds) == 2 and rounds[0]["before"] == first and rounds[0]["conversations"] == 32
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_shipped_base_is_what_this_code_builds() -> None:
    """models/phi3-miniature was built by `make miniature` from the current spec and corpus, and is small enough to
    ship: a change to utils/skills.py or MiniatureSpec without a rebuild fails here."""
    from dataclasses import asdict

    from utils import config
    from utils.miniature import MiniatureSpec, corpus_fingerprint, require_shipped_miniature, train_sentencepiece
    from utils.skills import train_test_corpus

    path = require_shipped_miniature()
    report = load_report(path)
    spec = MiniatureSpec()
    assert report["spec"] == asdict(spec)
    train, test = train_test_corpus(spec.pretrain_examples, spec.heldout_examples, seed=spec.seed)
    assert report["corpus_sha256"] == corpus_fingerprint(train + test)
    # The SentencePiece model is what training it on this corpus gives (its trainer is deterministic).
    texts = [m["content"] for r in train for m in r["messages"]]
    assert (path / "tokenizer.model").read_bytes() == train_sentencepiece(texts, spec.vocab_size)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.num_parameters() == report["parameters"]
    assert sum(f.stat().st_size for f in path.iterdir()) < 10 * 2**20
    assert path == config.PROJECT_ROOT / "models" / "phi3-miniature"
