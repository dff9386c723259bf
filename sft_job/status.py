"""Where a run is, read back from its output location: `sft-job status OUTPUT_URI`.

    sft-job status s3://my-bucket/runs/gpt2-alpaca [--json] [--watch]

Reads only what the job writes there: job.yaml (what is trained), progress.json (phase, step,
losses, speed; see sft_job.progress), the committed checkpoints, metrics/summary.json and
_SUCCESS. Phases: not-started, training, finishing, done, preempted (stopped with exit 75,
waiting for a restart), failed (stopped with exit 1/2/3), stalled (no progress written for
`stale_minutes` while it should be running: the process is likely gone).
"""

from __future__ import annotations

import calendar
import json
import time
from typing import Any

import yaml

from sft_job import storage
from sft_job.errors import NoRunError
from sft_job.progress import PROGRESS_FILE

SUCCESS = "_SUCCESS"
RUNNING = ("not-started", "training", "finishing")
FINAL = ("done", "failed")
_PHASES = {"starting": "not-started", "training": "training", "finishing": "finishing",
           "done": "finishing", "preempted": "preempted", "failed": "failed"}


def read_status(uri: str, stale_minutes: float = 30.0, now: float | None = None) -> dict[str, Any]:
    """The status of the run at `uri`. NoRunError (exit 2) when nothing of a run is there;
    AccessError (exit 3) when the location cannot be listed or read."""
    now = time.time() if now is None else now
    keys = set(storage.list_keys(uri))  # a missing bucket or denied listing raises here
    ckpts = storage.committed_dirs(storage.join(uri, "checkpoints"))
    if not ckpts and not keys & {"job.yaml", PROGRESS_FILE, SUCCESS}:
        raise NoRunError(f"{uri}: no sft-job run there (no job.yaml, {PROGRESS_FILE}, "
                         "checkpoints or _SUCCESS); check the URI (output.uri of the spec)")
    spec = _yaml(storage.join(uri, "job.yaml")) if "job.yaml" in keys else {}
    prog = _json(storage.join(uri, PROGRESS_FILE)) if PROGRESS_FILE in keys else {}
    out: dict[str, Any] = {"uri": uri, **_spec_facts(spec, prog)}
    out["checkpoint"] = _checkpoint(ckpts[0]) if ckpts else None
    for k in ("step", "max_steps", "epoch", "train_loss", "train_loss_step", "eval_loss",
              "eval_loss_step", "tokens_per_s", "seconds_per_step", "attempt", "exit_code",
              "error", "trackers"):
        out[k] = prog.get(k)
    out["updated_at"] = prog.get("updated_at") or (out["checkpoint"] or {}).get("committed_at")
    out["updated_ago_s"] = _ago(out["updated_at"], now)
    if out["step"] is None and out["checkpoint"]:
        out["step"] = out["checkpoint"]["step"]
    out["phase"] = _phase(SUCCESS in keys, prog, out, stale_minutes)
    if out["phase"] == "done" and "metrics/summary.json" in keys:
        summary = _json(storage.join(uri, "metrics/summary.json"))
        out["step"] = summary.get("steps", out["step"])
        for k in ("train_loss", "eval_loss", "tokens_per_s"):
            out[k] = summary.get(k, out[k])
        out["wall_s"] = summary.get("wall_s")
    out["eta"], out["eta_s"] = _eta(out, now)
    return out


def _phase(success: bool, prog: dict[str, Any], out: dict[str, Any], stale_minutes: float) -> str:
    if success:
        return "done"
    phase = _PHASES.get(prog.get("phase", ""), "training" if out["checkpoint"] else "not-started")
    ago = out["updated_ago_s"]
    if phase in RUNNING and ago is not None and ago > stale_minutes * 60:
        return "stalled"
    return phase


def _spec_facts(spec: dict[str, Any], prog: dict[str, Any]) -> dict[str, Any]:
    sec = {k: spec.get(k) if isinstance(spec.get(k), dict) else {}
           for k in ("model", "data", "method", "train")}
    return {"name": spec.get("name") or prog.get("name"), "model": sec["model"].get("base"),
            "method": sec["method"].get("kind"), "data": sec["data"].get("train"),
            "epochs": sec["train"].get("epochs"), "report_to": sec["train"].get("report_to")}


def _checkpoint(uri: str) -> dict[str, Any]:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    marker = _json(storage.join(uri, storage.COMMIT_MARKER))
    return {"name": name, "step": int(name.rsplit("-", 1)[-1]), "uri": uri,
            "committed_at": marker.get("committed_at")}


def _eta(out: dict[str, Any], now: float) -> tuple[str | None, float | None]:
    sps, step, total = out.get("seconds_per_step"), out.get("step"), out.get("max_steps")
    if out["phase"] != "training" or not (sps and total and step is not None):
        return None, None
    base = _epoch(out["updated_at"]) or now
    eta = base + max(0, total - step) * sps
    return _utc(eta), round(max(0.0, eta - now), 1)


def _yaml(uri: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(storage.read_text(uri))
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _json(uri: str) -> dict[str, Any]:
    try:
        doc = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _epoch(iso: str | None) -> float | None:
    try:
        return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ"))) if iso else None
    except ValueError:
        return None


def _ago(iso: str | None, now: float) -> float | None:
    t = _epoch(iso)
    return None if t is None else round(now - t, 1)


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# ---------------------------------------------------------------- output


def render(st: dict[str, Any]) -> str:
    """The status as aligned lines for a person."""
    rows = [("run", f"{st['name'] or '?'} at {st['uri']}")]
    if st["model"]:
        rows.append(("model", f"{st['model']} ({st['method'] or '?'}), data {st['data'] or '?'}"))
    rows.append(("phase", st["phase"] + _phase_note(st)))
    if st["step"] is not None:
        total = st["max_steps"]
        pct = f" ({100 * st['step'] / total:.1f}%)" if total else ""
        ep = f", epoch {st['epoch']:.2f}" if isinstance(st.get("epoch"), float) else ""
        rows.append(("step", f"{st['step']} / {total or '?'}{pct}{ep}"))
    ck = st["checkpoint"]
    rows.append(("checkpoint", f"{ck['name']} committed {ck['committed_at'] or '?'}"
                 f"{_ago_text(ck['committed_at'])}" if ck else "none committed yet"))
    losses = []
    if st["train_loss"] is not None:
        losses.append(f"train {st['train_loss']:.4f}" + _at(st.get("train_loss_step")))
    if st["eval_loss"] is not None:
        losses.append(f"eval {st['eval_loss']:.4f}" + _at(st.get("eval_loss_step")))
    if losses:
        rows.append(("loss", ", ".join(losses)))
    speed = []
    if st["tokens_per_s"]:
        speed.append(f"{st['tokens_per_s']:,.0f} tokens/s")
    if st["seconds_per_step"]:
        speed.append(f"{st['seconds_per_step']:.2f} s/step")
    if speed:
        rows.append(("speed", ", ".join(speed)))
    if st["eta"]:
        rows.append(("eta", f"{st['eta']} (in {_duration(st['eta_s'])})"))
    if st["error"] and st["phase"] in ("failed", "preempted"):
        rows.append(("error", f"exit {st['exit_code']}: {st['error']}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _phase_note(st: dict[str, Any]) -> str:
    ago = st["updated_ago_s"]
    if st["phase"] == "stalled":
        return f" (no progress for {_duration(ago)}: the job is likely not running)"
    if st["phase"] == "preempted":
        return " (stopped with exit 75 after a committed checkpoint; a restart resumes it)"
    if st["phase"] in RUNNING and ago is not None:
        return f" (updated {_duration(ago)} ago)"
    return ""


def _at(step: Any) -> str:
    return f" (step {step})" if step is not None else ""


def _ago_text(iso: str | None) -> str:
    ago = _ago(iso, time.time())
    return f" ({_duration(ago)} ago)" if ago is not None else ""


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(max(0, s))
    if s < 90:
        return f"{s}s"
    if s < 5400:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def status_cli(uri: str, as_json: bool, watch: bool, interval: float, stale_minutes: float) -> None:
    """Print the status once, or every `interval` seconds with --watch until the run is done
    or failed (Ctrl-C stops watching)."""
    while True:
        st = read_status(uri, stale_minutes)
        print(json.dumps(st, sort_keys=True) if as_json else render(st), flush=True)
        if not watch or st["phase"] in FINAL:
            return
        try:
            time.sleep(interval)
        except KeyboardInterrupt:  # the normal way to stop watching
            return
        if not as_json:
            print(f"--- {_utc(time.time())}", flush=True)
