"""Merge a Terraform `settings` output into the KEY=value settings file of `make submit-*`.

    terraform -chdir=terraform/gcp output -json settings | python3 terraform/settings.py cluster.local.env

Keys from Terraform replace the same keys in the file; every other line (your own settings,
comments) is kept. mk/cluster.mk reads the file as `KEY ?= value`, so values cannot hold spaces.
"""

import json
import re
import sys
from pathlib import Path

_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)=")
_HEADER = "# Written by `make tf-settings` from the Terraform outputs (rerun it after an apply)."


def merge(existing: str, settings: dict[str, str]) -> str:
    """Return the file text with `settings` written over the keys they name."""
    for key, value in settings.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) or re.search(r"\s", str(value)):
            raise ValueError(f"setting {key}={value!r}: keys are identifiers, values hold no spaces")
    kept = [
        line
        for line in existing.splitlines()
        if line != _HEADER and not ((m := _LINE.match(line)) and m.group(1) in settings)
    ]
    while kept and not kept[-1].strip():
        kept.pop()
    new = [_HEADER, *(f"{k}={v}" for k, v in sorted(settings.items()))]
    return "\n".join([*kept, "", *new] if kept else new) + "\n"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    path = Path(sys.argv[1])
    settings = json.load(sys.stdin)
    if not isinstance(settings, dict) or not settings:
        sys.exit("error: expected a non-empty JSON object on stdin (terraform output -json settings)")
    old = path.read_text() if path.exists() else ""
    path.write_text(merge(old, {k: str(v) for k, v in settings.items()}))
    print(f"{path}: wrote {', '.join(sorted(settings))}")


if __name__ == "__main__":
    main()
