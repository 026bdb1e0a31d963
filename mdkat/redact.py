"""Secrets never leave the pipeline: passwords in URLs are replaced by `***` before anything is logged."""

from __future__ import annotations

import re
from typing import Any

_PASSWORD_IN_URL = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]*)@"
)


def redact(value: Any) -> Any:
    """The value with any password in a URL (`scheme://user:password@host`) replaced by `***`."""
    if isinstance(value, str):
        return _PASSWORD_IN_URL.sub(r"\g<scheme>\g<user>:***@", value)
    return value
