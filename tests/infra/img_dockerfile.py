"""Just enough Dockerfile and lock-file parsing for the image tests (no Docker needed)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
HARDWARE = ("cpu", "cuda", "tpu")


@dataclass
class Instruction:
    """One instruction, continuation lines joined; `comments` are the lines right above it."""

    op: str
    args: str
    line: int
    comments: list[str] = field(default_factory=list)


@dataclass
class Stage:
    """A build stage: its FROM (unexpanded), its name and its instructions."""

    base: str
    name: str | None
    instructions: list[Instruction]

    def ops(self, op: str) -> list[Instruction]:
        return [i for i in self.instructions if i.op == op]

    def env(self) -> dict[str, str]:
        """ENV key=value pairs of this stage (later values win)."""
        out: dict[str, str] = {}
        for ins in self.ops("ENV"):
            for token in shlex.split(ins.args):
                key, _, value = token.partition("=")
                out[key] = value
        return out


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]
    instructions: list[Instruction]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def _logical_lines(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, instruction text, comment lines above) with backslash continuations joined."""
    out: list[tuple[int, str, list[str]]] = []
    comments: list[str] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            comments = [*comments, line] if line else []
            continue
        if buf and line.startswith("#"):  # comment inside a continued RUN
            continue
        if not buf:
            start = n
        buf += (" " if buf else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            out.append((start, buf, comments))
            buf, comments = "", []
    return out


def parse(path: Path) -> Dockerfile:
    """Parse a Dockerfile into global ARGs and stages."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    instructions: list[Instruction] = []
    for line, text, comments in _logical_lines(path.read_text()):
        op, _, args = text.partition(" ")
        ins = Instruction(op.upper(), args.strip(), line, comments)
        instructions.append(ins)
        if ins.op == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.I)
            assert m, f"{path}:{line}: unparsable FROM"
            stages.append(Stage(m.group(1), m.group(2), []))
        elif not stages and ins.op == "ARG":
            key, _, value = ins.args.partition("=")
            global_args[key] = value.strip('"')
        elif stages:
            stages[-1].instructions.append(ins)
    return Dockerfile(path, global_args, stages, instructions)


def dockerfile(hw: str) -> Dockerfile:
    return parse(IMAGES / hw / "Dockerfile")


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)", re.M)


@dataclass
class Lock:
    """A compiled lock: its sft-job header facts and its pins {normalized name: version}."""

    path: Path
    header: dict[str, str]
    pins: dict[str, str]
    text: str


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock(hw: str) -> Lock:
    path = IMAGES / hw / "requirements.lock"
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("# sft-job image lock:"), f"{path}: no header; run `make locks`"
    header = dict(kv.split("=", 1) for kv in first.split(":", 1)[1].split())
    pins = {normalize(m.group(1)): m.group(3) for m in _PIN.finditer(text)}
    return Lock(path, header, pins, text)
