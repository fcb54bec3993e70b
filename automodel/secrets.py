"""Keeping secrets out of everything automodel writes: logs, config dumps, loggers' run configs, error lines.

A secret reaches a run in three ways, and each is masked where text leaves the process:
- the environment (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, ...): any value of
  a variable whose name says it is a credential is replaced wherever it appears, e.g. after `${oc.env:HF_TOKEN}`
  put it into a resolved config or a path in an error message;
- a config key whose name says it is one (`api_key`, `token`, `password`, ...): its value is masked;
- credentials inside a URL (`https://user:pass@host`, an MLflow tracking URI).
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
_SECRET_WORDS = {"token", "secret", "password", "passwd", "credential", "credentials", "apikey"}
_KEY_KINDS = {"api", "access", "secret", "private", "auth", "encryption", "signing"}  # X_KEY names a credential
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<cred>[^/@\s:]+:[^/@\s]+)@")
_SHORTEST = 6  # shorter values ("1", "true") are not credentials, and masking them would garble every line


def is_secret_name(name: str) -> bool:
    """HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, api_key, password: yes. bos_token_id, num_key_value_heads,
    tokenizer, chunk_tokens: no (the name must end in the credential word)."""
    words = [w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w]
    if not words:
        return False
    return words[-1] in _SECRET_WORDS or (words[-1] == "key" and len(words) > 1 and words[-2] in _KEY_KINDS)


def _env_secrets() -> list[str]:
    """Values of the credential-named variables of this process now (longest first: a value containing
    another is masked whole)."""
    values = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= _SHORTEST}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """`text` with every known secret masked."""
    if not isinstance(text, str) or not text:
        return text
    for value in _env_secrets():
        if value in text:
            text = text.replace(value, MASK)
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def redact_config(node):
    """A plain (resolved) config container, with secret-named keys and secret values masked: what may be shown
    to a logger, saved with a checkpoint or printed."""
    if isinstance(node, dict):
        return {k: (MASK if is_secret_name(k) and node[k] not in (None, "") else redact_config(node[k]))
                for k in node}
    if isinstance(node, (list, tuple)):
        return type(node)(redact_config(v) for v in node)
    return redact_text(node) if isinstance(node, str) else node


class RedactFilter(logging.Filter):
    """On automodel's log handlers (console and train.log): every record is masked before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
