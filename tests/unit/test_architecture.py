"""The rules of docs/architecture.md, checked on the source of every module of sft_job/: each
import (top level or inside a function) must point down the layers, the spec and the base
import no training library, typer stays in the CLI layer, only the CLI exits the process, and
no function is over 50 lines nor module over 400. Reads the files with `ast`; imports nothing
of sft_job."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sft_job"

# module -> part: the first prefix that matches (a package prefix covers its modules)
PARTS = [
    ("sft_job.__main__", "cli"), ("sft_job.cli", "cli"),
    *[(f"sft_job.{m}", "job") for m in ("pipeline", "context", "prepare", "fit",
                                         "finalize", "preflight", "memory", "progress",
                                         "status", "specload")],
    ("sft_job.finish", "finish"), ("sft_job.train", "train"),
    ("sft_job.checkpoint", "checkpoint"), ("sft_job.synth", "synth"),
    ("sft_job.data", "data"), ("sft_job.models", "models"), ("sft_job.storage", "storage"),
    *[(f"sft_job.{m}", "spec") for m in ("spec", "specbase", "spectrainer")],
    *[(f"sft_job.{m}", "base") for m in ("errors", "uri", "topology", "environment",
                                          "credentials", "specyaml")],
    ("sft_job", "base"),  # sft_job/__init__.py: the version
]
BELOW = {  # the parts each part may import besides itself (docs/architecture.md)
    "cli": {"job", "finish", "train", "checkpoint", "synth", "data", "models", "storage",
            "spec", "base"},
    "job": {"finish", "train", "checkpoint", "data", "models", "storage", "spec", "base"},
    "finish": {"train", "checkpoint", "data", "models", "storage", "spec", "base"},
    "train": {"checkpoint", "data", "models", "storage", "spec", "base"},
    "checkpoint": {"storage", "spec", "base"},
    "synth": {"data", "storage", "spec", "base"},
    "data": {"models", "storage", "spec", "base"},
    "models": {"storage", "spec", "base"},
    "storage": {"base"},
    "spec": {"base"},
    "base": set(),
}
# specload reads a spec from a path or a bucket and validates it: nothing of the job's work
NARROWER = {"sft_job.specload": {"spec", "storage", "base"}}
TRAINING_LIBS = {"torch", "transformers", "trl", "peft", "deepspeed", "accelerate", "datasets",
                 "bitsandbytes", "torch_xla"}
# modules that validate a spec (or sit under it): no training library, even transitively
NO_TRAINING_LIBS = ("sft_job.spec", "sft_job.specbase", "sft_job.spectrainer",
                    "sft_job.specload", "sft_job.uri", "sft_job.errors", "sft_job.environment",
                    "sft_job.credentials", "sft_job.specyaml", "sft_job.topology")
CLI_LIBS = {"typer", "click"}
EXITS = {("sys", "exit"), ("os", "_exit")}
# the process exits outside the CLI layer, each with its reason
KNOWN_EXITS = {
    "sft_job.checkpoint.preempt": "a second SIGTERM/SIGINT exits at once with 75: the signal "
                                  "handler cannot unwind a training step",
    "sft_job.checkpoint.uploader": "the uploader's own spawned process ends itself when its "
                                   "parent (the training process) is gone",
}


MAX_FUNCTION_LINES = 50  # `def` line to last line (decorators not counted)
MAX_MODULE_LINES = 400
# modules over the limit for now, each with the most lines it may have and why
LARGE_FOR_NOW: dict[str, tuple[int, str]] = {}


def part_of(module: str) -> str:
    for prefix, part in PARTS:
        if module == prefix or module.startswith(prefix + "."):
            return part
    raise AssertionError(f"{module}: in no part of docs/architecture.md; add it to PARTS")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, at any depth; relative imports
    resolved; `from sft_job import storage` gives sft_job.storage."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = modules()
    out = []
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                keep = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*keep, *([base] if base else [])])
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            out += [(node.lineno, s) for s in subs] or [(node.lineno, base)]
    return out


def exits(path: Path) -> list[int]:
    """Lines that end the process: sys.exit(...), os._exit(...), exit()/quit(), raise
    SystemExit."""
    out = []
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Call):
            f = node.func
            qualified = (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                         and (f.value.id, f.attr) in EXITS)
            if qualified or (isinstance(f, ast.Name) and f.id in ("exit", "quit")):
                out.append(node.lineno)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                out.append(node.lineno)
    return out


MODULES = modules()


def test_every_module_is_in_a_part() -> None:
    for name in MODULES:
        part_of(name)


@pytest.mark.parametrize("name", list(MODULES))
def test_imports_point_down_the_layers(name: str) -> None:
    path = MODULES[name]
    mine = part_of(name)
    allowed = NARROWER.get(name, BELOW[mine])
    broken = []
    for line, target in imports(name, path):
        top = target.split(".")[0]
        if top in CLI_LIBS and mine != "cli":
            broken.append(f"{path.name}:{line} imports {target}: only the CLI layer uses typer")
        if top != "sft_job":
            continue
        theirs = part_of(target)
        if (theirs != mine or name in NARROWER) and theirs not in allowed:
            broken.append(f"{path.name}:{line} imports {target} ({theirs}); {name} ({mine}) "
                          f"may import only {', '.join(sorted(allowed)) or 'nothing of sft_job'}")
    assert not broken, f"{name} breaks docs/architecture.md:\n" + "\n".join(broken)


def reachable(name: str) -> dict[str, str]:
    """Every module of sft_job that importing `name` can import (any depth, inside functions
    too), each with the module that imports it first."""
    seen = {name: ""}
    todo = [name]
    while todo:
        cur = todo.pop()
        for _, target in imports(cur, MODULES[cur]):
            while target not in MODULES and "." in target:  # from x.y import a_function
                target = target.rpartition(".")[0]
            if target in MODULES and target not in seen:
                seen[target] = cur
                todo.append(target)
    return seen


@pytest.mark.parametrize("name", NO_TRAINING_LIBS)
def test_spec_and_base_need_no_training_library(name: str) -> None:
    """A spec validates (`sft-job validate`'s cheap pass, `--help`) without torch & co, even
    through what it imports inside functions."""
    broken = []
    for mod, via in reachable(name).items():
        for line, target in imports(mod, MODULES[mod]):
            if target.split(".")[0] in TRAINING_LIBS:
                broken.append(f"{mod}:{line} imports {target}" + (f" (via {via})" if via else ""))
    assert not broken, f"{name} reaches a training library:\n" + "\n".join(broken)


def test_synth_is_imported_only_by_the_cli() -> None:
    users = sorted({name for name, path in MODULES.items() for _, t in imports(name, path)
                    if t.startswith("sft_job.synth") and part_of(name) != "synth"})
    assert users == ["sft_job.cli.data"], users


@pytest.mark.parametrize("name", list(MODULES))
def test_only_the_cli_exits_the_process(name: str) -> None:
    """Errors become exit codes in cli.main alone; elsewhere an error is raised."""
    if part_of(name) == "cli":
        return
    lines = exits(MODULES[name])
    if name in KNOWN_EXITS:
        assert lines, f"{name}: no process exit left; drop it from KNOWN_EXITS"
        return
    assert not lines, f"{name} ends the process at line(s) {lines}: raise an SftJobError"


def test_the_checker_sees_a_broken_rule(tmp_path: Path) -> None:
    """The checker itself: an upward import inside a function, typer and an exit are found."""
    bad = tmp_path / "spec.py"
    bad.write_text("import sys\n\ndef f():\n    from sft_job import storage\n    import typer\n"
                   "    sys.exit(2)\n")
    found = imports("sft_job.spec", bad)
    assert (4, "sft_job.storage") in found and (5, "typer") in found
    assert part_of("sft_job.storage") not in BELOW["spec"]
    assert exits(bad) == [6]


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(qualified name, line, lines) of every function or method in the file over `limit`
    lines, nested ones included (`outer.<locals>.inner`, `Class.method`)."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                size = child.end_lineno - child.lineno + 1
                if size > limit:
                    out.append((name, child.lineno, size))
                visit(child, f"{name}.<locals>.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree(path), "")
    return out


def module_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_function_is_over_50_lines() -> None:
    """The house rule (docs/architecture.md): a function longer than a screen is split into
    functions that each do one named thing."""
    found = [f"{MODULES[name].relative_to(PACKAGE.parent)}:{line} {func}: {size} lines"
             for name in MODULES for func, line, size in long_functions(MODULES[name])]
    assert not found, (f"functions over {MAX_FUNCTION_LINES} lines (split each into functions "
                       "that do one named thing):\n" + "\n".join(found))


def test_no_module_is_over_400_lines() -> None:
    """The house rule (docs/architecture.md): a module over 400 lines is split by what it does.
    A module of LARGE_FOR_NOW may not grow past the size it has there."""
    found = []
    for name, path in MODULES.items():
        size = module_lines(path)
        limit = LARGE_FOR_NOW.get(name, (MAX_MODULE_LINES, ""))[0]
        if size > max(limit, MAX_MODULE_LINES):
            found.append(f"{path.relative_to(PACKAGE.parent)}: {size} lines (limit {limit})")
    assert not found, "modules over their size limit (split them by what they do):\n" + \
        "\n".join(found)


def test_the_size_checker_sees_a_long_function(tmp_path: Path) -> None:
    """The checker itself: a 51-line method and a 51-line nested function are found with
    their names and sizes, a 50-line function is not; a 401-line file counts 401 lines."""
    body = "    x = 1\n"
    bad = tmp_path / "big.py"
    bad.write_text("def ok():\n" + body * 49  # lines 1-50
                   + "class C:\n    def m(self):\n" + ("    " + body) * 50  # 51, 52-102
                   + "def outer():\n    def inner():\n" + ("    " + body) * 50  # 103, 104-154
                   + "    return inner\n"  # 155
                   + "x = 0\n" * (401 - 155))
    assert module_lines(bad) == 401
    assert long_functions(bad) == [("C.m", 52, 51), ("outer", 103, 53),
                                   ("outer.<locals>.inner", 104, 51)]
