"""Chat templates: the one ChatML template, and the rule for tokenizers that have none.

A tokenizer without a chat template (GPT-2, GPT-Neo) renders chat rows with ChatML; the
template is then given to the tokenizer, so the model trained and shipped with it carries it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# ChatML, with {% generation %} markers around each reply so TRL's assistant_only_loss works
# with it too (the markers render nothing).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens chat templates end a turn with; generation stops at any that the vocabulary has.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def has_template(tokenizer: Any) -> bool:
    """The tokenizer carries a chat template of its own (or one the spec gave it)."""
    return bool(getattr(tokenizer, "chat_template", None))


def fallback(tokenizer: Any) -> str | None:
    """The `chat_template=` argument of apply_chat_template for this tokenizer: None (its own
    template) or ChatML when it has none."""
    return None if has_template(tokenizer) else CHATML_TEMPLATE


def ensure_template(tokenizer: Any, warn: bool = True) -> bool:
    """Give a tokenizer without a chat template ChatML (a logged warning unless `warn` is
    False: `validate` reports it itself); True when it had none."""
    if has_template(tokenizer):
        return False
    if warn:
        log.warning("the tokenizer has no chat template: chat rows are rendered with ChatML")
    tokenizer.chat_template = CHATML_TEMPLATE
    return True
