"""Peak memory of merging a LoRA adapter: the job's shard-by-shard merge against PEFT's
merge_and_unload() on the fully loaded model, each in its own fresh process, same inputs.

    nice .venv/bin/python bench/merge_memory.py                 # ~1.5 GB fp32 model, ~3-6 min
    nice .venv/bin/python bench/merge_memory.py --layers 48     # ~2.7 GB

A random Llama (hidden 1024, 24 layers, vocab 32000: ~370M parameters, 1.5 GB in fp32) is
written as safetensors shards of --shard-mb, and a rank-16 all-linear LoRA adapter is made
with PEFT on it (init_lora_weights=False, so the merge changes every adapted weight). Then:
  ours  sft_job.finish.merge.merge_adapter(base, adapter, out)  (what the job runs)
  peft  AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload()
        + save_pretrained (the usual recipe)
Each runs in a new process; peak RSS is the kernel's high-water mark of that process (VmHWM in
/proc/self/status; it counts file pages mapped by safetensors too), and the parent polls
/proc/PID/status for the peak of anonymous memory (RssAnon: what cannot be dropped from the
page cache). The import floor (RSS
after importing the libraries) is shown so the merge's own cost is visible. Finally the two
merged models are compared tensor by tensor, and both against the base. Temp files (several
GB) are deleted at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

GB = 1024**3


def make_base(out: Path, layers: int, shard_mb: int) -> int:
    """The random base model of the benchmark (fp32 safetensors shards); returns its bytes."""
    return c.write_random_llama(out, dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
        tie_word_embeddings=False), "float32", shard_mb)


def make_adapter(base: Path, out: Path, r: int) -> None:
    """A PEFT LoRA adapter (all linear layers) with non-zero A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM",
                     init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(out))


# ---------------------------------------------------------------- the two merges (children)

def _status(field: str) -> int:
    """A byte count from /proc/self/status (VmHWM: this process's peak RSS since exec;
    ru_maxrss is not used because Linux carries the forking parent's peak into it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(kind: str, base: Path, adapter: Path, out: Path, result: Path) -> None:
    t0 = time.perf_counter()
    import torch
    import transformers  # noqa: F401

    if kind == "peft":
        import peft  # noqa: F401
    floor = _status("VmHWM")
    t1 = time.perf_counter()
    if kind == "ours":
        from sft_job.finish.merge import merge_adapter

        merge_adapter(base, adapter, out)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.save_pretrained(str(out), safe_serialization=True)
    result.write_text(json.dumps({"import_s": t1 - t0, "merge_s": time.perf_counter() - t1,
                                  "import_floor_bytes": floor,
                                  "peak_rss_bytes": _status("VmHWM")}))


def _poll_anon(pid: int, peak: list[int], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        stop.wait(0.02)


def run_child(kind: str, base: Path, adapter: Path, out: Path, tmp: Path) -> dict[str, Any]:
    result = tmp / f"{kind}.json"
    p = subprocess.Popen([sys.executable, __file__, "--child", kind, str(base), str(adapter),
                          str(out), str(result)], cwd=c.REPO)
    peak, stop = [0], threading.Event()
    th = threading.Thread(target=_poll_anon, args=(p.pid, peak, stop), daemon=True)
    th.start()
    code = p.wait()
    stop.set()
    th.join()
    if code:
        sys.exit(f"{kind} merge failed with exit code {code}")
    r = json.loads(result.read_text())
    r["peak_anon_bytes"] = peak[0]
    return r


def compare(a: Path, b: Path, base: Path) -> dict[str, Any]:
    """Tensor by tensor: merged (ours) vs merged (PEFT), and merged vs base."""
    import torch
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                out.update({k: f for k in h.keys()})  # noqa: SIM118
        return out

    ia, ib, i0 = index(a), index(b), index(base)
    if set(ia) != set(ib):
        return {"equal": False, "reason": f"key sets differ: {sorted(set(ia) ^ set(ib))[:5]}"}
    worst, changed, dtypes_ok = 0.0, 0, True
    for k in sorted(ia):
        with safe_open(str(ia[k]), framework="pt") as fa, safe_open(str(ib[k]), framework="pt") as fb:
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
        dtypes_ok &= ta.dtype == tb.dtype
        worst = max(worst, float((ta.float() - tb.float()).abs().max()))
        with safe_open(str(i0[k]), framework="pt") as f0:
            changed += bool(float((ta.float() - f0.get_tensor(k).float()).abs().max()) > 0)
        del ta, tb
    del torch
    return {"equal": worst <= 1e-5 and dtypes_ok, "max_abs_diff": worst, "tensors": len(ia),
            "changed_vs_base": changed, "dtypes_match": dtypes_ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24, help="24: ~1.5 GB fp32; 48: ~2.7 GB")
    ap.add_argument("--shard-mb", type=int, default=400)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tmp", default=None, help="where the GBs of temp files go (default: TMPDIR)")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *paths = args.child
        child(kind, *(Path(p) for p in paths))
        return
    info = c.machine()
    c.print_machine(info)
    with tempfile.TemporaryDirectory(prefix="bench-merge-", dir=args.tmp) as tmp_s:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        size = make_base(tmp / "base", args.layers, args.shard_mb)
        shards = len(list((tmp / "base").glob("*.safetensors")))
        make_adapter(tmp / "base", tmp / "adapter", args.rank)
        print(f"base: {size / GB:.2f} GB fp32 in {shards} shards; adapter r={args.rank} "
              f"all-linear ({(tmp / 'adapter' / 'adapter_model.safetensors').stat().st_size / 1e6:.0f}"
              f" MB); made in {time.perf_counter() - t:.0f} s", flush=True)
        res = {}
        for kind in ("ours", "peft"):
            res[kind] = run_child(kind, tmp / "base", tmp / "adapter", tmp / f"out-{kind}", tmp)
            print(f"  {kind}: peak RSS {res[kind]['peak_rss_bytes'] / GB:.2f} GB", flush=True)
        cmp = compare(tmp / "out-ours", tmp / "out-peft", tmp / "base")
    rows = [[k, f"{v['import_floor_bytes'] / GB:.2f}", f"{v['peak_rss_bytes'] / GB:.2f}",
             f"{(v['peak_rss_bytes'] - v['import_floor_bytes']) / GB:.2f}",
             f"{v['peak_anon_bytes'] / GB:.2f}", f"{v['merge_s']:.1f}"] for k, v in res.items()]
    print(f"\nmodel {size / GB:.2f} GB in {shards} shards of <= {args.shard_mb} MB")
    print(c.table(["merge", "RSS after imports GB", "peak RSS GB", "peak - imports GB",
                   "peak anon RSS GB", "merge + save s"], rows))
    ratio = res["peft"]["peak_rss_bytes"] / res["ours"]["peak_rss_bytes"]
    anon = res["peft"]["peak_anon_bytes"] / max(1, res["ours"]["peak_anon_bytes"])
    print(f"peak RSS peft/ours: {ratio:.2f}x (anonymous memory: {anon:.2f}x)")
    print(f"results equal: {cmp['equal']} (max |ours - peft| = {cmp.get('max_abs_diff', 0):.2e} over "
          f"{cmp.get('tensors')} tensors; {cmp.get('changed_vs_base')} tensors differ from the base)")
    print("temp files removed")
    c.write_json(args.json, {"machine": info, "model_bytes": size, "shards": shards,
                             "results": res, "compare": cmp, "ratio_peak_rss": ratio})
    if not cmp["equal"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
