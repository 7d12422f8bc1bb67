"""Credentials out of anything we echo: config values logged to MLflow, written to summaries and records.

An address like ``tcp://user:secret@scheduler:8786`` or a tracking URI with
``?password=...`` is a normal config value, but its secret must not land in an
MLflow param, a run's ``summary.md`` or ``config.json``. ``redact`` keeps the
rest of the address (scheme, host, port, path) so the record still says where
things ran.
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@host -> scheme://user:***@host ; scheme://token@host -> scheme://***@host
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s]+)@")
# ?password=... / &token=... / ;api_key=... (values up to the next separator)
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_.\-]*(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|auth|credential|signature)[A-Za-z0-9_.\-]*))"
    r"=(?P<value>[^&;#\s]*)",
    re.IGNORECASE,
)


def _mask_userinfo(match: re.Match) -> str:
    user, sep, _password = match.group("userinfo").partition(":")
    kept = f"{user}:{MASK}" if sep else MASK  # a lone userinfo part is usually a token
    return f"{match.group('scheme')}{kept}@"


def redact(text: str) -> str:
    """``text`` with URL credentials (user:password@, token@) and secret query values replaced by ***."""
    text = _USERINFO.sub(_mask_userinfo, text)
    return _SECRET_PARAM.sub(lambda m: f"{m.group('key')}={MASK}", text)


def redact_value(value: object) -> object:
    """``redact`` applied to every string inside ``value`` (dicts, lists and tuples are walked)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item) for item in value)
    return value
