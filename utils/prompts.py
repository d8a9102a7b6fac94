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
    out, inside = [], False
    for token, m in zip(tokens, mask):
        if m and not inside:
            out.append(open_)
        elif not m and inside:
            out.append(close)
        inside = bool(m)
        out.append(tokenizer.convert_tokens_to_string([token]))
    return "".join(out) + (close if inside else "")
