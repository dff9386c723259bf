"""Reading a spec's YAML safely, and `${VAR}` interpolation.

One bounded YAML reader: at most MAX_SPEC_BYTES of text, MAX_NODES values once aliases are
expanded (a 1 kB alias bomb expands to a billion), nesting as deep as the parser allows, keys
given twice refused, merge keys (`<<: *defaults`) honoured. `${VAR}`, `${VAR:-default}` (the
default may hold `${OTHER}` itself) and `$${` for a literal `${` are interpolated into the parsed
string values; anything else starting with `${` is an error naming the field, and so is a
variable that holds a credential.
"""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from sft_job.credentials import is_credential_name
from sft_job.errors import SpecError

MAX_SPEC_BYTES = 1 << 20
MAX_NODES = 100_000

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Malformed(ValueError):
    """A `${` that does not start a valid reference (message says why)."""


def _parse_ref(text: str, i: int) -> tuple[int, str, list[Any] | None]:
    """Parse the reference starting at text[i] == '${'. Returns (end, name, default parts or
    None); a default part is a literal str or a nested (end, name, default) tuple."""
    m = _NAME.match(text, i + 2)
    if not m:
        raise _Malformed("'${' must be followed by a variable name (write '$${' for a literal "
                         "'${')")
    name, j = m.group(0), m.end()
    if text.startswith("}", j):
        return j + 1, name, None
    if not text.startswith(":-", j):
        raise _Malformed(f"'${{{name}' must end with '}}' or go on with ':-default}}'")
    parts: list[Any] = []
    j += 2
    depth, buf = 0, []
    while j < len(text):
        if text.startswith("$${", j):
            buf.append("${")
            j += 3
        elif text.startswith("${", j):
            parts.append("".join(buf))
            buf = []
            end, inner, default = _parse_ref(text, j)
            parts.append((inner, default))
            j = end
        elif text[j] == "}" and depth == 0:
            parts.append("".join(buf))
            return j + 1, name, parts
        else:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            buf.append(text[j])
            j += 1
    raise _Malformed(f"'${{{name}:-' is never closed with '}}'")


def _expand(text: str, missing: list[str]) -> str:
    out, i = [], 0
    while True:
        k = text.find("$", i)
        if k < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:k])
        if text.startswith("$${", k):
            out.append("${")
            i = k + 3
        elif text.startswith("${", k):
            end, name, default = _parse_ref(text, k)
            out.append(_value(name, default, missing))
            i = end
        else:
            out.append("$")
            i = k + 1


def _value(name: str, default: list[Any] | None, missing: list[str]) -> str:
    if is_credential_name(name):
        raise _Malformed(f"${{{name}}} names a credential variable: credentials are never "
                         "interpolated into a spec (it is written to job.yaml and the model "
                         "card); the job reads them from the environment itself")
    val = os.environ.get(name)
    if val is not None:
        return val
    if default is None:
        missing.append(name)
        return ""
    return "".join(p if isinstance(p, str) else _value(p[0], p[1], missing) for p in default)


def interpolate_env(value: Any, source: str, path: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` inside the string values of a parsed spec (not in
    its text: a value with '#' stays whole and a comment never needs a variable). An unset
    variable without default, a malformed reference or a credential variable is an error
    naming the field."""
    if isinstance(value, dict):
        return {k: interpolate_env(v, source, f"{path}.{k}" if path else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_env(v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value
    missing: list[str] = []
    try:
        out = _expand(value, missing)
    except _Malformed as e:
        raise SpecError(f"{source}: {path}: {e}") from None
    if missing:
        raise SpecError(f"{source}: {path}: environment variable(s) "
                        f"{', '.join(sorted(set(missing)))} not set "
                        "(use ${VAR:-default} for optional ones)")
    return out


# ---------------------------------------------------------------- YAML


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently);
    keys merged in with `<<:` may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values `node` stands for once every alias is expanded (aliases share their node)."""
    got = memo.get(id(node))
    if got is not None:
        return got
    memo[id(node)] = MAX_NODES + 1  # a node that contains itself expands forever
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_NODES + 1)
    return memo[id(node)]


def _hold_refs(text: str, held: dict[str, str], bad: dict[int, str]) -> str:
    """Swap each well-formed `${...}` for a plain placeholder, so a reference may stand where
    YAML would read its braces as flow syntax; malformed ones stay (and fail with their field,
    or, if they break the YAML, with their line: `bad` maps line numbers to the problem)."""
    out, i = [], 0
    while (k := text.find("${", i)) >= 0:
        if k > 0 and text[k - 1] == "$":  # '$${': a literal '${'
            out.append(text[i:k + 2])
            i = k + 2
            continue
        try:
            end = _parse_ref(text, k)[0]
        except _Malformed as e:
            bad.setdefault(text.count("\n", 0, k) + 1, str(e))
            out.append(text[i:k + 2])
            i = k + 2
            continue
        key = f"__sft_job_env_{len(held)}__"
        held[key] = text[k:end]
        out.append(text[i:k] + key)
        i = end
    out.append(text[i:])
    return "".join(out)


def _restore(value: Any, held: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _restore(v, held) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, held) for v in value]
    if isinstance(value, str) and "__sft_job_env_" in value:
        for key, original in held.items():
            value = value.replace(key, original)
    return value


def load_yaml(text: str, source: str) -> Any:
    """Parse spec text (bounded, see the module docstring); ${VAR} references are kept as
    written in the string values, for `interpolate_env`."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: the spec is {size:,} bytes; a job spec is at most "
                        f"{MAX_SPEC_BYTES:,} (put long lists such as eval prompts in the data)")
    held: dict[str, str] = {}
    bad: dict[int, str] = {}
    loader = _SpecLoader(_hold_refs(text, held, bad))
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_NODES:
            raise SpecError(f"{source}: the spec expands to more than {MAX_NODES:,} values "
                            "(YAML aliases referring to aliases?); write it out plainly")
        doc = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        if line in bad:  # a broken ${...} broke the YAML: say that, not the YAML symptom
            raise SpecError(f"{source}:{line}: {bad[line]}") from None
        raise SpecError(f"{source}{_where(e)}: invalid YAML: {_problem(e)}") from None
    except RecursionError:
        raise SpecError(f"{source}: invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()
    return _restore(doc, held)


def _where(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark else ""


def _problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and ctx_mark and mark and ctx_mark.line != mark.line:
        problem += f" ({ctx} at line {ctx_mark.line + 1})"
    return problem
