"""Memory estimate vs measured peak: `sft-job validate`'s per-device estimate next to the peak RSS
a short real run records (summary.json), for a few methods and shapes on CPU.

    python bench/memory.py [--steps 2] [--only demo-lora,full,...] [--json out.json]

Each case is the demo spec (SmolLM2-135M, builtin) or the smoke spec (tiny Llama) with overrides,
run as a subprocess for `--steps` optimizer steps. The ratio printed is estimate / measured: the
estimate is there to catch jobs that cannot fit, so it should sit near 1 and not below it by much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO, SMOKE = "jobs/demo-smollm2.yaml", "jobs/smoke-cpu.yaml"
CASES: dict[str, tuple[str, list[str]]] = {
    "demo-lora": (DEMO, []),
    "chat-lora-512": (DEMO, ["data.train=sft_job/sample_data/chat.jsonl", "data.format=chat",
                             "data.max_length=512", "train.batch_size=4"]),
    "full": (DEMO, ["method.kind=full", "train.learning_rate=1e-5"]),
    "qlora": (DEMO, ["method.kind=qlora"]),
    "lora-checkpointing": (DEMO, ["method.gradient_checkpointing=true"]),
    "chat-512-checkpointing": (DEMO, ["data.train=sft_job/sample_data/chat.jsonl",
                                      "data.format=chat", "data.max_length=512",
                                      "train.batch_size=4", "method.gradient_checkpointing=true"]),
    "tiny-lora": (SMOKE, []),
}


def run_case(spec: str, sets: list[str], steps: int, work: Path) -> dict[str, float]:
    out = work / "out"
    args = [f"output.uri={out}", f"train.max_steps={steps}", "eval.num_samples=0",
            "eval.prompts=null", "output.merge=false", "data.eval_fraction=0", *sets]
    cli = [sys.executable, "-m", "sft_job"]
    flags = [x for s in args for x in ("--set", s)]
    rep = work / "validate.json"
    subprocess.run([*cli, "validate", spec, "--samples", "0", "--json", str(rep), *flags],
                   cwd=REPO, capture_output=True, text=True, check=False)
    est = json.loads(rep.read_text())["facts"]["memory"]
    t = time.perf_counter()
    res = subprocess.run([*cli, "run", spec, *flags], cwd=REPO, capture_output=True, text=True,
                         check=False)
    if res.returncode:
        raise SystemExit(f"{spec} {sets}: exit {res.returncode}\n{res.stderr[-2000:]}")
    summary = json.loads((out / "metrics/summary.json").read_text())
    peak = max(r["peak_rss_gb"] for r in summary["ranks"])
    return {"estimate_gb": est["total_gb"], "measured_gb": peak,
            "ratio": round(est["total_gb"] / peak, 2), "breakdown_gb": est["breakdown_gb"],
            "wall_s": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--only", default=",".join(CASES))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  load {os.getloadavg()}")
    results = {}
    for name in a.only.split(","):
        spec, sets = CASES[name]
        with tempfile.TemporaryDirectory(prefix="sft-mem-") as d:
            r = run_case(spec, sets, a.steps, Path(d))
        results[name] = r
        print(f"{name:<20} estimate {r['estimate_gb']:6.2f} GB  measured {r['measured_gb']:6.2f} GB"
              f"  estimate/measured {r['ratio']:.2f}  {r['breakdown_gb']}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
