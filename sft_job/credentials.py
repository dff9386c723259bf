"""Which environment variables hold credentials, so that none of them reaches a spec (and from
there job.yaml, samples.md, the model card or the Hub): `${VAR}` interpolation refuses them by
name, and a spec value holding the value of one is refused too (e.g. a shell-expanded `--set`).
"""

from __future__ import annotations

import os
import re
from typing import Any

# Name parts that mark a credential; matched on '_'-separated words of the upper-cased name,
# so KEY matches AWS_ACCESS_KEY_ID and MY_KEY but not MONKEY or KEYBOARD.
_WORDS = re.compile(
    r"(^|_)(SECRETS?|TOKENS?|PASSWORD|PASSWD|PASS|PWD_HASH|PASSPHRASE|CREDENTIALS?|CREDS|KEY|KEYS"
    r"|APIKEY|PRIVATE|AUTH|AUTHORIZATION|COOKIE|SESSION|SIGNATURE|PAT|CONNECTION_STRING|DSN"
    r"|SAS)(_|$)"
)
# Known credential variables of the clouds and services a job talks to, whatever their name.
KNOWN = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_OAUTH_ACCESS_TOKEN", "CLOUDSDK_AUTH_ACCESS_TOKEN",
    "CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE", "GOOGLE_CREDENTIALS", "GCP_SERVICE_ACCOUNT_KEY",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "HF_API_TOKEN", "HF_TOKEN_PATH",
    "OPENAI_API_KEY", "OPENAI_ORG_ID", "OPENAI_ORGANIZATION", "OPENAI_PROJECT_ID",
    "AZURE_OPENAI_API_KEY", "AZURE_STORAGE_KEY", "AZURE_CLIENT_SECRET",
    "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "COMET_API_KEY",
})
_MIN_SECRET_LEN = 12  # shorter values ("testing", "true") are too common to be told apart


def is_credential_name(name: str) -> bool:
    """Whether the environment variable `name` holds (or points at) a credential."""
    upper = name.upper()
    return upper in KNOWN or bool(_WORDS.search(upper))


def _secret_values() -> dict[str, str]:
    """value -> name of every set credential variable whose value could be a secret (not a
    path or URL: those locate a credential, and specs hold paths)."""
    out = {}
    for name, value in os.environ.items():
        v = value.strip()
        if (len(v) >= _MIN_SECRET_LEN and is_credential_name(name) and "://" not in v
                and not v.startswith(("/", "~", "."))):
            out[v] = name
    return out


def find_in(doc: Any, path: str = "") -> list[tuple[str, str]]:
    """(dotted field, variable name) for every string in `doc` that contains the value of a
    credential variable of this process's environment."""
    values = _secret_values()
    if not values:
        return []
    found: list[tuple[str, str]] = []

    def walk(v: Any, where: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{where}.{k}" if where else str(k))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{where}[{i}]")
        elif isinstance(v, str):
            found.extend((where, name) for secret, name in values.items() if secret in v)

    walk(doc, path)
    return found
