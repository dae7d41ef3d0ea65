"""Keep credentials out of everything the runner shows or stores.

A URI may carry credentials in two places: its user part (`s3://key:secret@bucket/...`)
and its query (`?secret_key=...`, `?token=...`). Config keys may be secret by name
(`hf_token`, `api_key`). What is shown or stored gets `***` in their place; the real
values stay in memory only, where the job needs them. A job sent with `jobs/submit.py`
carries its secrets in a package of its own (`runner.cluster.submit` makes it); its driver,
preparers and workers read them here.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

SECRETS_MODULE_ENV = "RUNNER_SECRETS_MODULE"  # the name of a submitted job's secrets package (not a secret)
SECRETS_FILE = "secrets.json"
# "hf_token", "api_key", "secret_key" are secrets; "max_new_tokens" is not.
SECRET_KEY = re.compile(
    r"(^|[_.-])token$|secret|passw|api_?key|access_?key|credential|auth|signature|^sig$", re.IGNORECASE
)
# scheme://user:password@host or scheme://token@host, anywhere in a text (a URI inside a command line or YAML)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@\s'\"?#]+)@")
# key=value pairs of a query whose key names a secret: ?secret_key=...&token=...
_QUERY_SECRET = re.compile(r"(?P<key>[?&;][^=&\s'\"#]+)=(?P<value>[^&\s'\"#]+)")


def mask_text(text: str) -> str:
    """`text` with every credential inside URIs replaced by `***` (user parts, secret query values)."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)

    def query(m: re.Match) -> str:
        return f"{m['key']}=***" if SECRET_KEY.search(m["key"].lstrip("?&;")) else m.group(0)

    return _QUERY_SECRET.sub(query, text)


def redact(value: Any) -> Any:
    """Mask secret-looking keys and credentials embedded in URIs, recursively through dicts and lists."""
    if isinstance(value, dict):
        return {k: ("***" if SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.password or parts.username:
            host = parts.hostname or ""
            value = urlunsplit(parts._replace(netloc=f"***@{host}" + (f":{parts.port}" if parts.port else "")))
        return mask_text(value)
    return value


def holds_secret(text: str) -> bool:
    return mask_text(text) != text


def mask_files(paths: list[Path]) -> None:
    """Rewrite files (Hydra's saved configs) with every credential inside URIs masked."""
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        masked = mask_text(text)
        if masked != text:
            tmp = path.with_name(path.name + ".masking")
            tmp.write_text(masked)
            tmp.replace(path)


def submitted_secrets() -> dict:
    """In a submitted job (driver or worker): the secrets `jobs/submit.py` shipped with it, else {}."""
    name = os.environ.get(SECRETS_MODULE_ENV)
    if not name:
        return {}
    import importlib

    module = importlib.import_module(name)
    return json.loads((Path(module.__file__).parent / SECRETS_FILE).read_text())


def apply_submitted_env() -> None:
    """Set the submitted job's secret environment variables in this process (credentials for S3, the Hub)."""
    for key, value in submitted_secrets().get("env", {}).items():
        os.environ.setdefault(key, value)
