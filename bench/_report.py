"""The tables and checks bench/throughput.py prints: per-arm figures, CPU-time ratios (median
over runs, with min/max), and each of the job's arms' eval loss against each baseline's own
seed-to-seed spread."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import _common as c
from throughput import ARMS, BASELINES, BATCH, OURS, method


def report(runs: list[dict[str, dict[str, Any]]], stats: dict, info: dict, args: argparse.Namespace,
           ours_batch: int, n_params: int) -> dict[str, Any]:
    arms = sorted(args.arms, key=ARMS.index)
    col = lambda arm, key: [r[arm][key] for r in runs]  # noqa: E731
    rows = []
    for arm in arms:
        r0 = runs[0][arm]
        eff = f"{r0['tokens_all'] / r0['slots_all']:.3f}"
        rows.append([arm, r0.get("precision", "fp32" if arm.startswith("seed") else "bf16"),
                     r0["steps"], round(r0["examples"] / max(1, r0["steps"]), 1)
                     if arm != "seed-512" else BATCH, eff,
                     c.spread(col(arm, "tps_wall")), c.spread(col(arm, "tps_cpu")),
                     c.spread(col(arm, "eval_resp")), c.spread(col(arm, "eval_all")),
                     c.spread(col(arm, "peak_rss_gb"))])
    print()
    c.print_machine(info)
    print(f"model {args.model} ({n_params / 1e6:.1f}M params, {method(args)['kind']}), "
          f"{args.examples} train / {args.eval_examples} eval examples, lr {args.lr}, ours "
          f"{ours_batch} packed rows/step; data tokens: {stats}")
    print(c.table(["arm", "precision", "steps", "examples/step", "slot eff.", "useful tok/s (wall)",
                   "useful tok/CPU-s", "eval loss (response)", "eval loss (all tokens)",
                   "peak RSS GB"], rows))
    ratios = {}
    ours_arms = [a for a in arms if a in OURS]
    for arm in ours_arms:
        others = [b for b in arms if b in BASELINES] + \
            ([b for b in arms if b in OURS and b != arm] if arm == "ours" else [])
        for base in others:
            for unit in ("tps_cpu", "tps_wall"):
                ratios[f"{arm}/{base} {unit}"] = [r[arm][unit] / r[base][unit] for r in runs]
    if "ours-base" in arms:  # each lever alone, against the job without them
        for arm in ("ours-fp32", "ours-trlhead"):
            if arm in arms:
                ratios[f"{arm}/ours-base tps_cpu"] = [r[arm]["tps_cpu"] / r["ours-base"]["tps_cpu"]
                                                      for r in runs]
    loss = loss_checks(runs, arms)
    print()
    print(c.table(["ratio (same run), min / median / max", "value"],
                  [[k, c.spread(v)] for k, v in ratios.items()]
                  + [["seed-512 vs seed-longest per-step loss, max |diff|",
                      f"{max(r['seed-512']['loss_match'] for r in runs):.2e}"]]))
    print()
    print(c.table(["eval loss (response), arm vs baseline", "diff of means", "per-run rel. diff",
                   "baseline spread (max - min)", "within"], loss["rows"]))
    med = {k: statistics.median(v) for k, v in ratios.items()}
    for arm in ours_arms:
        goals = [(f"{arm}/trl-packed tps_cpu", 2.0), (f"{arm}/seed-longest tps_cpu", 3.0)]
        said = [f"{k.split()[0]} {med[k]:.2f}x ({'met' if med[k] >= g else 'NOT met'}, goal {g}x)"
                for k, g in goals if k in med]
        print(f"{arm}: median CPU-time ratios: {'; '.join(said)}")
    slim = [{a: {k: v for k, v in r[a].items()} for a in r} for r in runs]
    return {"machine": info, "args": vars(args), "data": stats, "ours_batch": ours_batch,
            "params": n_params, "runs": slim, "ratios": ratios, "loss": loss["table"]}


def loss_checks(runs: list[dict[str, dict[str, Any]]], arms: list[str]) -> dict[str, Any]:
    """Each of the job's arms against each baseline: the difference of the mean eval losses
    (response tokens) over the runs, and whether it lies within the baseline's own
    seed-to-seed spread (max - min over the same runs)."""
    rows, table = [], {}
    for arm in (a for a in arms if a in OURS):
        for base in (b for b in arms if b in BASELINES and b != "seed-512"):
            mine = [r[arm]["eval_resp"] for r in runs]
            theirs = [r[base]["eval_resp"] for r in runs]
            diff = statistics.mean(mine) - statistics.mean(theirs)
            spread = max(theirs) - min(theirs)
            rel = [100 * (a - b) / b for a, b in zip(mine, theirs, strict=True)]
            ok = abs(diff) <= spread
            table[f"{arm} vs {base}"] = {"diff": diff, "rel_pct": rel, "spread": spread, "ok": ok}
            rows.append([f"{arm} vs {base}", f"{diff:+.4f}", c.spread(rel) + " %",
                         f"{spread:.4f}", "yes" if ok else "NO"])
    return {"rows": rows, "table": table}
