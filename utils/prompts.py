"""Phi-3's chat format: special tokens, the chat template, and prompt/answer helpers.

The template is Phi-3 Mini's own, as TRL ships it (``trl.chat_template_utils.phi3_chat_template``). Because
the miniature carries exactly that template, TRL recognises it and swaps in its training twin with
``{% generation %}`` markers when ``assistant_only_loss=True``, just as it does for the real model.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
Conversation = list[Message]

SYSTEM, USER, ASSISTANT, END, ENDOFTEXT = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"
PHI3_SPECIAL_TOKENS: list[str] = [ENDOFTEXT, ASSISTANT, SYSTEM, END, USER]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


def phi3_chat_template() -> str:
    """Phi-3 Mini's chat template (the Jinja string TRL ships and recognises)."""
    from trl.chat_template_utils import phi3_chat_template as template

    return template


# Conversations on which two chat templates must write the same text to count as the same format.
_PROBES: list[tuple[Conversation, bool]] = [
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello."}], False),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
      {"role": "assistant", "content": "d"}], False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True),
    ([{"role": "user", "content": "Hi"}], True),
]


def writes_like(tokenizer: Any, template: str) -> bool:
    """True when the tokenizer's chat template writes the same text as ``template`` for system, user and assistant
    turns, one or several, with and without the generation prompt."""
    try:
        return all(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=g)
                   == tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=g, chat_template=template)
                   for c, g in _PROBES)
    except Exception:  # a template that cannot render these conversations (e.g. no system role) is another format
        return False


def ensure_trainable_template(tokenizer: Any, name: str = "the model") -> Any:
    """Make sure TRL can mask this tokenizer's chat template for ``assistant_only_loss``; returns the tokenizer.

    TRL adds its ``{% generation %}`` markers only to templates it knows byte for byte (Phi-3 Mini's and Phi-3.5's
    among them). A Phi-3 template spelled differently (a fine-tune re-saved with a reflowed template, say) writes
    exactly what Phi-3's writes and is replaced by TRL's copy, so every chapter trains and masks the same text.
    Any other template stops with :class:`utils.config.SettingsError` saying what to do.
    """
    from trl.chat_template_utils import get_training_chat_template

    from utils.config import SettingsError

    try:
        get_training_chat_template(tokenizer)
        return tokenizer
    except (ValueError, TypeError):  # TypeError: no template at all
        pass
    if writes_like(tokenizer, phi3_chat_template()):
        tokenizer.chat_template = phi3_chat_template()
        return tokenizer
    raise SettingsError(f"{name}: its chat template is not Phi-3's format, and TRL cannot add the "
                        "{% generation %} markers that assistant-only loss needs to it. Use a Phi-3 checkpoint, or "
                        "set tokenizer.chat_template to a template with {% generation %} ... {% endgeneration %} "
                        "around the assistant's text (see TRL's docs: chat templates, training templates).")


def prompt_messages(messages: Conversation) -> Conversation:
    """The conversation up to, not including, its last assistant turn: what the model is asked."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def reference_answer(messages: Conversation) -> str:
    """The content of the conversation's last assistant turn: what the model should answer."""
    return [m for m in messages if m["role"] == "assistant"][-1]["content"]


def render_prompt(tokenizer: Any, messages: Conversation) -> str:
    """The prompt text for generation, ending with ``<|assistant|>\\n`` (no EOS appended)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def assistant_mask(tokenizer: Any, messages: Conversation) -> tuple[list[str], list[int]]:
    """Tokens of the rendered conversation and, per token, 1 where TRL's ``assistant_only_loss`` trains on it.

    Uses the same training template (with ``{% generation %}`` markers) that ``SFTTrainer`` swaps in.
    """
    from trl.chat_template_utils import get_training_chat_template

    enc = tokenizer.apply_chat_template(messages, chat_template=get_training_chat_template(tokenizer),
                                        return_dict=True, return_assistant_tokens_mask=True)
    return tokenizer.convert_ids_to_tokens(enc["input_ids"]), list(enc["assistant_masks"])


def show_loss_mask(tokenizer: Any, messages: Conversation, open_: str = "⟦", close: str = "⟧") -> str:
    """The rendered conversation with the trained (assistant) spans wrapped in brackets."""
    tokens, mask = assistant_mask(tokenizer, messages)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    out, inside, written = [], False, ""
    for i, m in enumerate(mask):
        if m and not inside:
            out.append(open_)
        elif not m and inside:
            out.append(close)
        inside = bool(m)
        # Each token's text as the growing prefix decodes it: a SentencePiece tokenizer (Phi-3's) drops a word's
        # leading space when a token is decoded alone.
        text = tokenizer.decode(ids[:i + 1])
        out.append(text[len(written):])
        written = text
    return "".join(out) + (close if inside else "")
