"""Secrets never leave the pipeline: credentials in URLs are replaced by `***` before anything is printed,
logged or written.

One function, `redact`, for every URL or storage string the pipeline shows (errors, progress lines, MLflow
params and tags, `best.yaml`, manifests). It covers what the parsers in use accept as a password:
- userinfo: urllib splits the authority at its last `@`, SQLAlchemy (Optuna's and MLflow's stores) takes
  `[^@]*` after `user:` as the password, so a password may hold `:`, `/`, `?`, `#` or `@`. Everything
  between `scheme://user:` and the last `@` of the URL goes; a URL of another shape that happens to match
  loses more than its password, never less.
- the query string: libpq and SQLAlchemy accept `?password=...` (and the field's services use `token=`,
  `secret=`, `api_key=`, ...): their values go.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from typing import Any

# a URL runs to the next whitespace: a password may hold quotes, so a quote cannot end it (a quoted URL
# keeps its closing quote in the match, which changes nothing)
_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<rest>\S*)")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<key>(?:^|[?&;])(?:password|passwd|pwd|pass|sslpassword|token|secret|api_key|apikey|"
    r"access_key|secret_key|access_token)=)[^&;#]*"
)
MASK = "***"


def _redact_url(match: re.Match) -> str:
    rest = match["rest"]
    at = rest.rfind("@")
    if at != -1:
        user, colon, _ = rest[:at].partition(":")
        if colon:
            rest = f"{user}:{MASK}{rest[at:]}"
    return match["scheme"] + _SECRET_QUERY.sub(rf"\g<key>{MASK}", rest)


def redact(value: Any) -> Any:
    """The value with every credential in a URL (`scheme://user:password@host`, `?password=...`) replaced
    by `***`; non-strings as they are."""
    if isinstance(value, str):
        return _URL.sub(_redact_url, value)
    return value


def basic_auth(url: str) -> tuple[str, dict[str, str]]:
    """`url` without its userinfo, and the HTTP Basic header that carries it: urllib would take
    `user:password@` for part of the host name and sends no credentials itself."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, {}
    host = parts.netloc.rpartition("@")[2]
    login = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    token = base64.b64encode(login.encode()).decode("ascii")
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), {"Authorization": f"Basic {token}"}
