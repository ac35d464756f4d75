"""One masking function for every place a value is written: log lines, run_args.json, the model card, tracker params
and tags, uploaded files and error messages.

What is masked: the value of an option whose name looks secret (hub_token, ...), every value registered as secret
(those options' values, wherever else they show up), values of environment variables whose name looks secret
(HF_TOKEN, *_API_KEY, ...), and credentials inside URLs (user:password@, https://TOKEN@, token= / key= / signature=
query parameters).
"""

import dataclasses
import logging
import os
import re

MASK = "***"
# Option and environment variable names that hold secrets: hub_token, HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY,
# MLFLOW_TRACKING_PASSWORD... (not sample_max_new_tokens or TOKENIZERS_PARALLELISM).
SECRET_NAME = re.compile(r"(?:^|_)(?:api_?key|key|token|secret|password|passwd|credentials?)$", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+)(?::(?P<password>[^/\s]*))?@")
SECRET_QUERY_PARAMETER = re.compile(
    r"(?P<name>[?&;][\w.-]*?(?:token|key|signature|sig|credential|password|secret))=[^&#\s\"'<>)]*", re.IGNORECASE
)
MIN_SECRET_LENGTH = 8  # shorter values ('false', '1') are settings, not secrets
_registered: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask `value` wherever it appears from now on (e.g. a --hub_token that also ends up inside another string)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        _registered.add(value)


def register_secret_options(*argument_groups) -> None:
    """Register the values of every option whose name looks secret, so that they are masked wherever they appear."""
    for group in argument_groups:
        for option in dataclasses.fields(group):
            value = getattr(group, option.name)
            if SECRET_NAME.search(option.name) and isinstance(value, str):
                register_secret(value)


def secret_values() -> list[str]:
    """Registered secrets and the values of environment variables whose name looks secret, longest first."""
    found = _registered | {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(found, key=len, reverse=True)


def mask_url_credentials(match: re.Match) -> str:
    if match["password"] is not None:
        return f"{match['scheme']}{match['user']}:{MASK}@"
    if match["scheme"].lower().startswith("http"):  # a bare token used as the user name: https://TOKEN@host
        return f"{match['scheme']}{MASK}@"
    return match[0]  # az://container@account and the like name a place, not a secret


def mask_secrets(value, name: str = ""):
    """`value` with secrets replaced by '***'; dicts and lists are masked item by item (a dict key that looks secret
    masks its whole value)."""
    if isinstance(value, dict):
        return {key: mask_secrets(item, key) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [mask_secrets(item, name) for item in value]
    if value is not None and SECRET_NAME.search(name):
        return MASK
    if not isinstance(value, str):
        return value
    for secret in secret_values():
        value = value.replace(secret, MASK)
    value = URL_CREDENTIALS.sub(mask_url_credentials, value)
    return SECRET_QUERY_PARAMETER.sub(rf"\g<name>={MASK}", value)


class SecretMaskingFilter(logging.Filter):
    """Masks every record a handler writes, whichever library logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
