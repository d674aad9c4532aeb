"""Prompt encoding shared by the tasks: chat template when the tokenizer has one, context before question."""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, user: str, assistant_prefix: str = "", chat: bool = True) -> list[int]:
    """Token ids of ``user`` as one user turn (chat template if any and ``chat``), then ``assistant_prefix``.

    The template's own special tokens are kept; no extra BOS is added (SmolLM2's tokenizer adds none).
    """
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text + assistant_prefix, add_special_tokens=False)["input_ids"]
    return tokenizer(user + assistant_prefix)["input_ids"]


def encode_question(tokenizer: Any, question: str) -> list[int]:
    """The question alone (what prompt-guided scorers use as the query)."""
    return tokenizer(question, add_special_tokens=False)["input_ids"]
