"""A scripted stand-in for `gcloud` (tests/infra/test_tpu_watch.py puts it on PATH as gcloud).

No Google Cloud project can be reached from the tests, so this plays the TPU API and the TPU
VMs from a JSON scenario (FAKE_GCLOUD_SCENARIO) and appends every call's argv, one JSON list
per line, to FAKE_GCLOUD_LOG. The scenario holds a list of "slices": each `queued-resources
create` brings the next one to life, `delete` removes it. A slice has sequences of answers;
each call takes the next one, and the last one repeats:
  qr          `queued-resources describe` states (WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED...)
  node        `tpu-vm describe` states (READY, PREEMPTED...)
  containers  what each status ssh finds on every worker: "running", "exited 75", "missing";
              "running +success": running, and the job has just written _SUCCESS
With no live slice, both describes fail as gcloud does (NOT_FOUND, exit 1). A container seen
"exited 0" writes _SUCCESS into the scenario's "output" folder, as the job would have.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    path = Path(os.environ["FAKE_GCLOUD_SCENARIO"])
    sc = json.loads(path.read_text())
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\n")
    live = sc["slices"][sc["live"]] if sc.get("live") is not None else None
    verb = " ".join(argv[2:4])  # compute tpus <group> <verb>
    code = 0
    if verb == "queued-resources create":
        sc["live"] = sc.get("created", 0)
        sc["created"] = sc["live"] + 1
    elif verb == "queued-resources delete":
        sc["live"] = None
    elif verb in ("queued-resources describe", "tpu-vm describe"):
        key = "qr" if argv[2] == "queued-resources" else "node"
        if live is None:
            print(f"ERROR: (gcloud) NOT_FOUND: {argv[4]} not found", file=sys.stderr)
            code = 1
        else:
            print(_next(live, key))
    elif verb == "tpu-vm ssh" and any("sft-job-status" in a for a in argv):
        state = _next(live, "containers")
        for w in range(sc.get("workers", 1)):
            status, _, exit_code = state.removesuffix(" +success").partition(" ")
            print(f"sft-job-status t1v-worker-{w} {status} {exit_code or '-'}")
        if state in ("exited 0", "running +success") and sc.get("output"):
            Path(sc["output"]).mkdir(parents=True, exist_ok=True)
            Path(sc["output"], "_SUCCESS").write_text("")
    path.write_text(json.dumps(sc))
    return code


def _next(live: dict[str, list[str]], key: str) -> str:
    seq = live.setdefault(key, ["READY"] if key == "node" else ["running"])
    return seq.pop(0) if len(seq) > 1 else seq[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
