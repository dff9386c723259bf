"""Record formats -> text segments: which characters the model reads and which it learns.

Each record becomes an `Example`: a list of (text, trainable) segments whose concatenation is
the training text, plus the prompt used for before/after generation. Formats:

- alpaca:          instruction/input/output with the seed template or the Stanford one
- chat:            a messages list rendered with the tokenizer's chat template (ChatML if none);
                   every assistant turn is trained, everything else is masked
- prompt-response: two fields wrapped in role tokens (`<|user|>` ... `<|assistant|>` ...)
- text:            one field, all of it trained
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sft_job.data.load import Record
from sft_job.errors import DataError
from sft_job.spec import DataSpec

FORMATS = ("alpaca", "chat", "prompt-response", "text")

SEED_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nOutput:"
SEED_TEMPLATE_NO_INPUT = "Instruction: {instruction}\nOutput:"
STANFORD_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
STANFORD_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class PlainChatML:
    """A stand-in tokenizer that renders chat rows with ChatML in plain Python: the cheap
    preflight pass checks the structure of every chat row before any tokenizer is loaded."""

    chat_template = CHATML_TEMPLATE

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False, chat_template: Any = None) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class RowError(ValueError):
    """A record that does not fit its format; the message says which field and why."""


@dataclass
class Example:
    segments: list[tuple[str, bool]]
    prompt: str  # what generation starts from (all text before the last trained segment)
    source: str


def detect(rows: list[dict[str, Any]], spec: DataSpec, source: str = "") -> str:
    """Guess the format from the fields of the first rows (the most common per-row guess, so a
    single broken row is reported as malformed rather than hiding the format)."""
    if not rows:
        raise DataError("no rows to detect the data format from")
    votes: dict[str, int] = {}
    for r in rows[:20]:
        fmt = _guess(set(r), spec)
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
    if votes:
        return max(votes, key=lambda f: votes[f])
    raise DataError(
        f"{source + ': ' if source else ''}cannot detect the data format from fields "
        f"{sorted(rows[0])}: expected "
        f"'{spec.messages_field}' (chat), instruction/input/output (alpaca), "
        f"'{spec.prompt_field}'/'{spec.response_field}' (prompt-response) or "
        f"'{spec.text_field}' (text); set data.format and the field names"
    )


def _guess(keys: set[str], spec: DataSpec) -> str | None:
    if spec.messages_field in keys or "conversations" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {spec.prompt_field, spec.response_field} <= keys:
        return "prompt-response"
    if spec.text_field in keys:
        return "text"
    return None


def check_fields(fmt: str, rows: list[dict[str, Any]], spec: DataSpec, source: str) -> None:
    """Fail early when a named format does not match the data at all (likely the wrong format)."""
    need = {
        "alpaca": {"instruction", "output"},
        "chat": {spec.messages_field},
        "prompt-response": {spec.prompt_field, spec.response_field},
        "text": {spec.text_field},
    }[fmt]
    if fmt == "chat" and rows and "conversations" in rows[0]:
        return
    for r in rows[:5]:
        missing = need - set(r)
        if missing == need:
            raise DataError(f"{source}: data.format is '{fmt}' but the rows have fields "
                            f"{sorted(r)} and none of {sorted(need)}; is the format right?")


def _text(row: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise RowError(f"missing field '{key}'")
    val = row[key]
    if not isinstance(val, str):
        raise RowError(f"field '{key}' must be a string, got {type(val).__name__}")
    if not allow_empty and not val.strip():
        raise RowError(f"empty '{key}'")
    _check_unicode(val, f"field '{key}'")
    return val


def _check_unicode(val: str, what: str) -> None:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer accepts."""
    try:
        val.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(f"{what} holds an invalid character ({val[e.start]!r} at {e.start}, a "
                       "lone UTF-16 surrogate)") from None


def alpaca_prompt(instruction: str, input_: str, template: str) -> str:
    """The prompt text of an Alpaca row (what precedes the output)."""
    if template == "stanford":
        t = STANFORD_TEMPLATE if input_.strip() else STANFORD_TEMPLATE_NO_INPUT
    else:
        t = SEED_TEMPLATE if input_.strip() else SEED_TEMPLATE_NO_INPUT
    return t.format(instruction=instruction.strip(), input=input_.strip())


def _alpaca(row: dict[str, Any], spec: DataSpec) -> list[tuple[str, bool]]:
    prompt = alpaca_prompt(_text(row, "instruction"), _text(row, "input", allow_empty=True)
                           if "input" in row else "", spec.alpaca_template)
    out = _text(row, "output").strip()
    sep = " " if spec.alpaca_template == "seed" else ""
    return [(prompt, False), (sep + out, True)]


def pr_prompt(prompt: str, spec: DataSpec) -> str:
    """The prompt text of a prompt-response row, role tokens included."""
    return f"{spec.user_token}\n{prompt.strip()}\n{spec.assistant_token}\n"


def _prompt_response(row: dict[str, Any], spec: DataSpec) -> list[tuple[str, bool]]:
    prompt = _text(row, spec.prompt_field)
    response = _text(row, spec.response_field).strip()
    return [(pr_prompt(prompt, spec), False), (response, True)]


def _messages(row: dict[str, Any], spec: DataSpec) -> list[dict[str, str]]:
    key = spec.messages_field if spec.messages_field in row else "conversations"
    msgs = row.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"field '{spec.messages_field}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(f"{spec.messages_field}[{i}] must be an object with role and content")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role not in ("system", "user", "assistant", "tool"):
            raise RowError(f"{spec.messages_field}[{i}].role must be system/user/assistant/tool, "
                           f"got {role!r}")
        if not isinstance(content, str) or (role == "assistant" and not content.strip()):
            raise RowError(f"{spec.messages_field}[{i}].content is empty or not a string")
        _check_unicode(content, f"{spec.messages_field}[{i}].content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise RowError(f"{spec.messages_field}: the last message must be from the assistant")
    return out


def _chat(row: dict[str, Any], spec: DataSpec, tokenizer: Any) -> list[tuple[str, bool]]:
    msgs = _messages(row, spec)
    # a tokenizer without a chat template (GPT-2, GPT-Neo) gets ChatML
    template = None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE

    def render(ms: list[dict[str, str]], gen: bool) -> str:
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen,
                                                 chat_template=template)
        except TemplateError as e:  # e.g. a template that refuses a system turn
            raise RowError(f"the chat template rejects this conversation: {e}") from None

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        full = render(msgs[: i + 1], False)
        if m["role"] == "assistant":
            head = render(msgs[:i], True)
            if not head.startswith(done) or not full.startswith(head):
                return _chat_last_turn(msgs, render)
            segments += [(head[len(done):], False), (full[len(head):], True)]
        else:
            if not full.startswith(done):
                return _chat_last_turn(msgs, render)
            segments.append((full[len(done):], False))
        done = full
    return [s for s in segments if s[0]]


def _chat_last_turn(msgs: list[dict[str, str]], render: Any) -> list[tuple[str, bool]]:
    """For templates that re-render earlier turns (not prefix-stable): train the last turn."""
    head = render(msgs[:-1], True)
    full = render(msgs, False)
    if not full.startswith(head):
        raise RowError("the chat template does not render a prompt that prefixes the full "
                       "conversation; set model.chat_template: chatml")
    return [(head, False), (full[len(head):], True)]


def to_example(rec: Record, fmt: str, spec: DataSpec, tokenizer: Any) -> Example:
    """Render one record; raises RowError when the row does not fit `fmt`."""
    row = rec.row
    if fmt == "alpaca":
        segs = _alpaca(row, spec)
    elif fmt == "prompt-response":
        segs = _prompt_response(row, spec)
    elif fmt == "chat":
        segs = _chat(row, spec, tokenizer)
    elif fmt == "text":
        segs = [(_text(row, spec.text_field), True)]
    else:
        raise DataError(f"data.format: unknown format '{fmt}' (choose {', '.join(FORMATS)})")
    if spec.train_on_prompt:
        segs = [(t, True) for t, _ in segs]
    last = max((i for i, (_, tr) in enumerate(segs) if tr), default=len(segs))
    prompt = "".join(t for t, _ in segs[:last]) if fmt != "text" else ""
    return Example(segs, prompt, rec.source)


def prompt_for(user_text: str, fmt: str, spec: DataSpec, tokenizer: Any) -> str:
    """Turn a plain user prompt (eval.prompts) into the prompt text of format `fmt`."""
    if fmt == "alpaca":
        return alpaca_prompt(user_text, "", spec.alpaca_template)
    if fmt == "prompt-response":
        return pr_prompt(user_text, spec)
    if fmt == "chat":
        template = None if getattr(tokenizer, "chat_template", None) else CHATML_TEMPLATE
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                             tokenize=False, add_generation_prompt=True,
                                             chat_template=template)
    return user_text
