"""`redact` against the URL parsers the pipeline hands its strings to: whatever urllib (downloads, MLflow's
HTTP client) or SQLAlchemy (Optuna's and MLflow's stores) would take as a password never survives it.

Property tests over seeded, generated URLs: random schemes, users, passwords drawn from every character a
userinfo may hold (reserved ones raw or percent-encoded), hosts, ports, paths and query strings, alone and
inside messages.
"""

from __future__ import annotations

import random
import string
import urllib.parse

import pytest
from sqlalchemy.engine import make_url

from mdkat.redact import MASK, redact

SCHEMES = ["https", "http", "postgresql", "postgresql+psycopg", "mysql+pymysql", "s3", "sqlite"]
RESERVED = ":/?#[]@!$&'()*+,;="
PASSWORD_ALPHABET = string.ascii_letters + string.digits + RESERVED + "-._~%"


def _password(rng: random.Random) -> str:
    # long enough that the secret, or a 6-character piece of it, turning up by chance elsewhere is impossible
    core = "".join(rng.choice(string.ascii_letters) for _ in range(10))
    extra = "".join(rng.choice(PASSWORD_ALPHABET) for _ in range(rng.randint(0, 8)))
    mixed = list(core + extra)
    rng.shuffle(mixed)
    text = "".join(mixed)
    return urllib.parse.quote(text, safe="") if rng.random() < 0.5 else text


def _url(rng: random.Random) -> str:
    scheme = rng.choice(SCHEMES)
    user = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 6)))
    host = rng.choice(["db.example.org", "127.0.0.1", "localhost", "[::1]"])
    port = rng.choice(["", ":5432", ":8080"])
    path = rng.choice(["", "/", "/mlflow", "/data/aligned_50.pkl", "/optuna?sslmode=require"])
    return f"{scheme}://{user}:{_password(rng)}@{host}{port}{path}"


def _parsed_passwords(url: str) -> list[str]:
    """The passwords urllib and SQLAlchemy read from `url` (raw and unquoted), where they read one."""
    found = []
    try:
        password = urllib.parse.urlsplit(url).password
    except ValueError:
        password = None
    if password:
        found += [password, urllib.parse.unquote(password)]
    try:
        sa_password = make_url(url).password
    except Exception:  # noqa: BLE001 - a string SQLAlchemy refuses has no password for it
        sa_password = None
    if sa_password:
        found += [str(sa_password)]
    return [p for p in found if len(p) >= 6]


@pytest.mark.parametrize("seed", range(4))
def test_no_password_any_parser_reads_survives_redaction(seed):
    rng = random.Random(seed)
    checked = 0
    for _ in range(500):
        url = _url(rng)
        secrets = _parsed_passwords(url)
        for shown in (redact(url), redact(f"could not reach {url}: refused"), redact(f"storage: '{url}'")):
            for secret in secrets:
                assert secret not in shown, (url, shown)
            checked += bool(secrets)
        # and what remains still parses to a masked password, with user and host kept
        again = redact(url)
        assert MASK in again and again.split("://", 1)[0] == url.split("://", 1)[0]
        assert again.endswith(url.rpartition("@")[2])
    assert checked > 1000, "the generator must produce URLs whose passwords the parsers read"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "postgresql://u@h/db?password=hunter22&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("https://h/x.pkl?token=abc123&dl=1", "https://h/x.pkl?token=***&dl=1"),
        ("https://h/x?Api_Key=zz", "https://h/x?Api_Key=***"),
        ("https://h/x?passage=1", "https://h/x?passage=1"),  # not a secret's name
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # urllib's last @, SQLAlchemy's first
        ("sqlite:///optuna.db", "sqlite:///optuna.db"),
        ("journal:optuna.journal", "journal:optuna.journal"),
    ],
)
def test_query_string_secrets_and_reserved_characters(value, expected):
    assert redact(value) == expected
