"""Time to the first optimizer step of the smoke job, by phase, and the CLI's cold-import time.

    nice .venv/bin/python bench/startup.py            # ~3-6 min on a loaded 2-core machine
    nice .venv/bin/python bench/startup.py --full-job # let the smoke job run to the end

1. `sft-job --help` in fresh processes (the console script, as users run it): wall time (median
   of --repeat), the modules it imports (PYTHONPROFILEIMPORTTIME) and a check that none of the
   heavy libraries below is among them (exit 1 if one is). `sft-job validate` is timed too, with
   the heavy modules it imports listed (it reads the data with the tokenizer, on purpose).
2. The smoke job (`jobs/smoke-cpu.yaml`, the builtin tiny Llama, LoRA, CPU) in a fresh process,
   twice. `natural`: the job as is, with only a callback that notes the end of optimizer step 1.
   `split`: the same, but the driver first imports the libraries the job needs (so import time
   is its own phase) and wraps the job's functions (spec load, data fetch/read, tokenization,
   packing, tokenizer/model fetch, model load, samples before training, trainer build) with
   timers. Every time is measured from the moment the parent starts the process. The job runs
   with train.max_steps=3 (only what happens after step 1 changes) unless --full-job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

# What `sft-job --help` must never import: each costs 0.3-6 s (../shared/NOTES.md).
HEAVY = ["torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed",
         "bitsandbytes", "tokenizers", "safetensors", "huggingface_hub", "numpy", "pandas",
         "pyarrow", "matplotlib", "boto3", "botocore", "google.cloud.storage", "torch_xla",
         "httpx", "yaml", "pydantic"]
# pydantic and yaml are light, but --help has no use for them either: listed to keep it so.
HELP_ALLOWED = {"yaml", "pydantic"}
SPEC = c.REPO / "jobs" / "smoke-cpu.yaml"
CLI = Path(sys.executable).with_name("sft-job")


def _cli() -> list[str]:
    return [str(CLI)] if CLI.is_file() else [sys.executable, "-m", "sft_job"]


def import_profile(argv: list[str]) -> tuple[float, dict[str, float]]:
    """Wall seconds of a fresh `sft-job ARGV` and {top-level module: cumulative import s}."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    p = subprocess.run(_cli() + argv, capture_output=True, text=True, env=env, cwd=c.REPO)
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"sft-job {' '.join(argv)} failed:\n{p.stderr[-2000:]}")
    mods: dict[str, float] = {}
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = [x.strip() for x in line.removeprefix("import time:").split("|")]
        try:
            cum = int(parts[1]) / 1e6
        except ValueError:
            continue  # the header line
        name = parts[2].strip()
        mods[name] = max(mods.get(name, 0.0), cum)
    return wall, mods


def heavy_in(mods: dict[str, float]) -> dict[str, float]:
    return {h: round(mods[h], 3) for h in HEAVY if h in mods}


def cli_table(repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, argv in (("--help", ["--help"]),
                        ("validate", ["validate", str(SPEC), "--samples", "0"])):
        walls, mods = [], {}
        for _ in range(repeat):
            w, mods = import_profile(argv)
            walls.append(w)
        top = sorted(((m, s) for m, s in mods.items() if "." not in m), key=lambda x: -x[1])[:8]
        out[label] = {"wall_s": walls, "heavy": heavy_in(mods),
                      "top_imports": [[m, round(s, 3)] for m, s in top],
                      "modules": len(mods)}
    rows = [[f"sft-job {k}", c.spread(v["wall_s"]), v["modules"],
             ", ".join(f"{m} {s:.2f}s" for m, s in v["top_imports"][:5]),
             ", ".join(v["heavy"]) or "none"] for k, v in out.items()]
    print(c.table(["command (fresh process)", "wall s min/med/max", "modules imported",
                   "slowest top-level imports (cumulative)", "heavy modules imported"], rows))
    bad = sorted(set(out["--help"]["heavy"]) - HELP_ALLOWED)
    out["help_ok"] = not bad
    print(f"--help must not import: {', '.join(h for h in HEAVY if h not in HELP_ALLOWED)}"
          f" -> {'OK' if not bad else 'FAIL: ' + ', '.join(bad)}")
    return out


# ---------------------------------------------------------------- the job, in a child process

def _child(out_path: str, split: bool, full: bool, out_uri: str) -> None:
    """Runs inside the fresh process: instrument, run the smoke job, write the timestamps."""
    t_main = time.time()
    marks: dict[str, Any] = {"t_main": t_main, "phases": {}}
    if split:
        t = time.time()
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from trl import SFTConfig, SFTTrainer  # noqa: F401

        import sft_job.pipeline  # noqa: F401
        marks["phases"]["imports (torch, transformers, datasets, trl, peft)"] = time.time() - t
    _instrument(marks, split)
    argv = ["sft-job", "run", str(SPEC), "--set", f"output.uri={out_uri}"]
    if not full:
        argv += ["--set", "train.max_steps=3"]
    sys.argv = argv
    from sft_job.cli import main

    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
    Path(out_path).write_text(json.dumps(marks))


def _timed(marks: dict[str, Any], label: str, fn: Any) -> Any:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t = time.time()
        try:
            return fn(*a, **kw)
        finally:
            if "t_first_step" not in marks:  # only what happens before the first step
                marks["phases"][label] = marks["phases"].get(label, 0.0) + time.time() - t
    return wrapper


def _instrument(marks: dict[str, Any], split: bool) -> None:
    """Wrap the job's steps (module attributes the pipeline looks up at call time)."""
    from sft_job.train import trainer as tr

    build = tr.build_trainer

    def build_trainer(*a: Any, **kw: Any) -> Any:
        t = time.time()
        built = build(*a, **kw)
        marks["phases"]["trainer build (SFTTrainer)"] = time.time() - t
        built.trainer.add_callback(_first_step_callback(marks))
        return built

    tr.build_trainer = build_trainer
    if not split:
        return
    import sft_job.data.load as load
    import sft_job.data.prepared as prepared
    import sft_job.finish.evaluate as ev
    import sft_job.models.load as ml
    import sft_job.models.source as ms
    import sft_job.specload as spec

    spec.load_spec = _timed(marks, "spec load + validation", spec.load_spec)
    load.fetch = _timed(marks, "data fetch", load.fetch)
    prepared.read_source = _timed(marks, "data read + format + tokenization (streamed)",
                                  prepared.read_source)
    prepared.write_rows = _timed(marks, "split + packing (BFD)", prepared.write_rows)
    ms.resolve_model_dir = _timed(marks, "model fetch + tokenizer load", ms.resolve_model_dir)
    ml.load_tokenizer = _timed(marks, "model fetch + tokenizer load", ml.load_tokenizer)
    ml.load_model = _timed(marks, "model load", ml.load_model)
    ev.generate = _timed(marks, "samples before training (generate)", ev.generate)


def _first_step_callback(marks: dict[str, Any]) -> Any:
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["t_train_begin"] = time.time()

        def on_step_end(self, args, state, control, **kw):
            if "t_first_step" not in marks:
                marks["t_first_step"] = time.time()

    return FirstStep()


def run_job(split: bool, full: bool, tmp: Path) -> dict[str, Any]:
    out = tmp / ("split" if split else "natural")
    marks_path = tmp / f"marks-{out.name}.json"
    env = {**os.environ, "SFT_JOB_WORKDIR": str(tmp / "work"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--child", str(marks_path), "--out-uri", str(out)]
    cmd += ["--split"] if split else []
    cmd += ["--full-job"] if full else []
    t0 = time.time()
    p = subprocess.run(cmd, env=env, cwd=c.REPO, capture_output=True, text=True)
    t_end = time.time()
    if p.returncode:
        sys.exit(f"smoke job failed ({p.returncode}):\n{p.stderr[-3000:]}")
    m = json.loads(marks_path.read_text())
    summary = json.loads((out / "metrics" / "summary.json").read_text())
    return {"t0": t0, "t_end": t_end, "marks": m, "summary_timings": summary["timings_s"],
            "first_step_s": m["t_first_step"] - t0, "interpreter_s": m["t_main"] - t0,
            "step1_s": m["t_first_step"] - m["t_train_begin"], "wall_s": t_end - t0}


def job_table(nat: dict[str, Any], spl: dict[str, Any]) -> None:
    phases = dict(spl["marks"]["phases"])
    rows = [["interpreter start + CLI module", round(spl["interpreter_s"], 2)]]
    rows += [[k, round(v, 2)] for k, v in phases.items()]
    rows.append(["optimizer step 1 (train() begin -> step 1 end)", round(spl["step1_s"], 2)])
    named = spl["interpreter_s"] + sum(phases.values()) + spl["step1_s"]
    rows.append(["other (imports inside phases, output probe, data split, resume lookup)",
                 round(spl["first_step_s"] - named, 2)])
    rows.append(["**process start -> first optimizer step**", round(spl["first_step_s"], 2)])
    print(c.table(["phase (split run)", "seconds"], rows))
    print(f"\nnatural run (no pre-imports, no timers): process start -> first optimizer step "
          f"{nat['first_step_s']:.2f} s (interpreter {nat['interpreter_s']:.2f} s, step 1 "
          f"{nat['step1_s']:.2f} s); whole process {nat['wall_s']:.1f} s")
    print(f"summary.json timings_s of the natural run: {json.dumps(nat['summary_timings'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per CLI command")
    ap.add_argument("--full-job", action="store_true", help="run the smoke job to the end")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--split", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-uri", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.split, args.full_job, args.out_uri)
        return
    info = c.machine()
    c.print_machine(info)
    print("\n## CLI cold start")
    cli = cli_table(args.repeat)
    print("\n## smoke job: process start -> first optimizer step")
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        nat = run_job(False, args.full_job, Path(tmp))
        spl = run_job(True, args.full_job, Path(tmp))
    job_table(nat, spl)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    c.write_json(args.json, {"machine": info, "cli": cli, "natural": nat, "split": spl,
                             "first_step_s": [nat["first_step_s"], spl["first_step_s"]],
                             "help_median_s": statistics.median(cli["--help"]["wall_s"])})
    if not cli["help_ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
