"""The Phi-3-Mini-shaped stand-in: real shape, real special-token ids and strip settings, the hub's chat template."""

from __future__ import annotations

import pytest

from utils.standin import GENERATION_EOS, PHI3_ADDED_TOKENS, PHI3_MINI_CHAT_TEMPLATE, PHI3_MINI_CONFIG


@pytest.fixture(scope="module")
def tokenizer():
    from utils.standin import tokenizer_texts, train_phi3_like_tokenizer

    return train_phi3_like_tokenizer(tokenizer_texts())


def test_special_tokens_sit_at_phi3_minis_ids(tokenizer) -> None:
    assert len(tokenizer) == 32011
    assert {i: tokenizer.convert_ids_to_tokens(i) for i in PHI3_ADDED_TOKENS} == {
        i: content for i, (content, _) in PHI3_ADDED_TOKENS.items()}
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 32000
    assert set(GENERATION_EOS) == set(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|end|>"]))


def test_chat_tokens_swallow_the_newline_after_them_as_phi3s_do(tokenizer) -> None:
    """rstrip=True: the text after <|assistant|> starts without the template's newline (chapter 05's trap)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert tokenizer.chat_template == PHI3_MINI_CHAT_TEMPLATE and prompt.endswith("<|end|>\n<|assistant|>\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == 32010 and ids[-1] == 32001 and ids[-2] == 32007
    assert tokenizer("<|endoftext|>\nx", add_special_tokens=False)["input_ids"][0] == 32000  # no rstrip on this one


def test_the_configuration_is_phi3_minis_own() -> None:
    """Counted on the meta device: Phi-3-mini-4k-instruct has 3,821,079,552 parameters."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config(**PHI3_MINI_CONFIG))
    assert sum(p.numel() for p in model.parameters()) == 3_821_079_552
    assert {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == {
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"}


def test_its_sentencepiece_model_tokenizes_as_its_tokenizer_json(tokenizer) -> None:
    """The stand-in ships tokenizer.model, as Phi-3 Mini does, for llama.cpp's converter (chapter 07): the same
    pieces at the same ids, and the same tokens for the project's text."""
    import sentencepiece

    from utils.standin import sentencepiece_model, tokenizer_texts

    sp = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model(tokenizer))
    assert sp.vocab_size() == 32000 and [sp.id_to_piece(i) for i in (0, 1, 2, 3)] == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert sp.is_byte(3) and sp.is_control(1) and sp.is_unknown(0)
    texts = tokenizer_texts()[:300] + ["Book cedar for 12 people, fri 3pm. Ünïcödé → bytes"]
    assert all(sp.encode(t) == tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
