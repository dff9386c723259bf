"""The trained tokens of a chat turn are exactly the reply and the template's own end-of-turn
token, for the template families users bring (ChatML, Llama 3, Mistral, Zephyr, one without any
end-of-turn token); alpaca and prompt-response rows through the model's template
(`data.template: model`); BOS never doubled. The tokenizer is the builtin tiny one with the
families' special tokens added."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sft_job.data.formats import Example, prompt_for, resolve_template, to_example
from sft_job.data.load import Record
from sft_job.data.tokenize import IGNORE, tokenize_example

CHATML = None  # the builtin tokenizer's own template
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
ZEPHYR = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
NO_END = (  # no end-of-turn token at all: the job's EOS ends the sample
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>", "zephyr": "</s>"}

MULTI = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "It is four."},
]


@pytest.fixture(scope="module")
def family_tok(tiny_llama_dir: Path) -> Callable[[str], Any]:
    from transformers import AutoTokenizer

    def make(family: str) -> Any:
        t = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
        if family in ("mistral", "zephyr"):
            t.add_special_tokens({"eos_token": "</s>", "bos_token": "<s>"})
        if family == "llama3":
            t.add_special_tokens({"bos_token": "<|begin_of_text|>", "additional_special_tokens": [
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        t.chat_template = {"chatml": t.chat_template, "llama3": LLAMA3, "mistral": MISTRAL,
                           "zephyr": ZEPHYR, "noend": NO_END}[family]
        return t

    return make


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    prev = False
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE:
            assert lab == i
            if not prev:
                runs.append([])
            runs[-1].append(i)
        prev = lab != IGNORE
    return runs


def encode(tok: Any, ex: Example) -> tuple[list[int], list[int]]:
    ids, labels, _ = tokenize_example(ex, tok, 1024)
    return ids, labels


@pytest.mark.parametrize("family", ["chatml", "llama3", "mistral", "zephyr"])
def test_each_reply_trained_with_exactly_its_end_of_turn_token(
        family: str, family_tok: Callable, spec_of: Callable) -> None:
    tok = family_tok(family)
    msgs = MULTI if family != "mistral" else MULTI[1:]  # that template has no system turn
    ex = to_example(Record({"messages": msgs}, "f:1"), "chat", spec_of(), tok)
    ids, labels = encode(tok, ex)
    end = tok.convert_tokens_to_ids(END[family])
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    runs = trained_runs(ids, labels)
    expected = [tok(r if family != "mistral" else " " + r, add_special_tokens=False)["input_ids"]
                + [end] for r in replies]
    assert runs == expected, [tok.decode(r) for r in runs]
    # one end token per turn the template ends, the last one ending the sample: none appended
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert ids[-1] == end and ids.count(end) == rendered.count(END[family])
    if tok.eos_token != END[family]:
        assert tok.eos_token_id not in ids


def test_no_trained_token_after_an_end_of_turn_token(family_tok: Callable, spec_of: Callable
                                                     ) -> None:
    """The bug a real model showed: `<|im_end|>\\n<|im_end|>` trained at the end of every row."""
    tok = family_tok("chatml")
    tok.eos_token = "<|im_end|>"  # as SmolLM2 and Qwen instruct tokenizers have it
    ex = to_example(Record({"messages": MULTI}, "f:1"), "chat", spec_of(), tok)
    ids, labels = encode(tok, ex)
    end = tok.eos_token_id
    for run in trained_runs(ids, labels):
        assert run.index(end) == len(run) - 1
    assert ids.count(end) == len(MULTI)  # one per turn, none appended


def test_template_without_end_token_gets_the_eos(family_tok: Callable, spec_of: Callable) -> None:
    tok = family_tok("noend")
    ex = to_example(Record({"messages": MULTI}, "f:1"), "chat", spec_of(), tok)
    assert not ex.ends_with_stop
    ids, labels = encode(tok, ex)
    runs = [tok.decode(r) for r in trained_runs(ids, labels)]
    # 'assistant: ' ends in a space the tokenizer merges with the reply's first word: that
    # token is trained (the model must produce it), so the runs start with the space
    assert runs == [" Hello! How can I help?\n", " It is four.\n" + tok.eos_token]


def test_llama3_bos_is_not_doubled(family_tok: Callable, spec_of: Callable) -> None:
    tok = family_tok("llama3")
    # this tokenizer adds no BOS by itself; make it one that does, as Llama 3's does
    from tokenizers import processors

    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
    assert tok("x")["input_ids"][0] == bos
    ex = to_example(Record({"messages": MULTI}, "f:1"), "chat", spec_of(), tok)
    ids, _ = encode(tok, ex)
    assert ids[0] == bos and ids.count(bos) == 1
    plain = to_example(Record({"text": "plain"}, "f:1"), "text", spec_of(), tok)
    assert encode(tok, plain)[0][0] == bos  # text without BOS still gets it


@pytest.mark.parametrize(("fmt", "row", "user", "reply"), [
    ("alpaca", {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
     "Add the numbers.\n\n2 and 3", "5"),
    ("alpaca", {"instruction": "Name a color.", "input": "", "output": "Blue."},
     "Name a color.", "Blue."),
    ("prompt-response", {"prompt": " Capital of France? ", "response": "Paris."},
     "Capital of France?", "Paris."),
])
def test_alpaca_and_prompt_response_through_the_models_template(
        fmt: str, row: dict, user: str, reply: str, tok: Any, spec_of: Callable) -> None:
    spec = spec_of()
    assert resolve_template(spec, tok) == "model"  # auto: the tokenizer has a template
    ex = to_example(Record(row, "f:1"), fmt, spec, tok)
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    assert "".join(t for t, _ in ex.segments) + "\n" == tok.apply_chat_template(msgs, tokenize=False)
    assert [t for t, tr in ex.segments if tr] == [reply + "<|im_end|>"]
    assert ex.prompt == tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt_for(user, fmt, spec, tok) == ex.prompt  # eval prompts rendered the same way


def test_native_template_without_chat_template(tok_no_template: Any, spec_of: Callable) -> None:
    spec = spec_of()
    assert resolve_template(spec, tok_no_template) == "native"
    ex = to_example(Record({"prompt": "Hi", "response": "Yo"}, "f:1"), "prompt-response", spec,
                    tok_no_template)
    assert ex.segments == [("<|user|>\nHi\n<|assistant|>\n", False), ("Yo", True)]


def test_chat_train_on_prompt_trains_every_token(family_tok: Callable, spec_of: Callable) -> None:
    tok = family_tok("llama3")
    ex = to_example(Record({"messages": MULTI}, "f:1"), "chat", spec_of(train_on_prompt=True), tok)
    ids, labels = encode(tok, ex)
    assert labels == ids and ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")


@pytest.mark.parametrize("family", ["chatml", "llama3", "mistral", "zephyr", "noend"])
def test_renderer_gives_what_apply_chat_template_gives(family_tok: Callable, family: str) -> None:
    """The data step renders with the compiled template directly (formats.Renderer, made once
    per chunk); every prefix of a conversation, with and without the generation prompt, is
    byte-identical to transformers' own apply_chat_template, and so is a tokenizer without a
    template (ChatML fallback)."""
    from sft_job.data.formats import Renderer

    tok = family_tok(family)
    render = Renderer(tok)
    odd = [{"role": "user", "content": "  spaces, {{ braces }}, <|im_end|> and\nnewlines  "},
           {"role": "assistant", "content": "ok\n"}]
    for conv in (MULTI, odd):
        for i in range(1, len(conv) + 1):
            for gen in (False, True):
                want = tok.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=gen)
                assert render(conv[:i], gen) == want, (family, i, gen)


def test_renderer_chatml_fallback_and_template_errors(tok_no_template: Any) -> None:
    """A tokenizer without a template renders with ChatML, as apply_chat_template(chat_template=
    CHATML_TEMPLATE) does; a template that raises is a RowError naming the template's message."""
    from sft_job.data.formats import Renderer, RowError
    from sft_job.models.chat import CHATML_TEMPLATE

    conv = MULTI[1:3]
    got = Renderer(tok_no_template)(conv, False)
    assert got == tok_no_template.apply_chat_template(conv, tokenize=False,
                                                      chat_template=CHATML_TEMPLATE)
    tok_no_template.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                                     "{{ raise_exception('no system turns') }}{% endif %}x")
    with pytest.raises(RowError, match="rejects this conversation: no system turns"):
        Renderer(tok_no_template)(MULTI, False)
    tok_no_template.chat_template = None
