"""Last in the run: no log file the run's servers wrote (gunicorn, agents, nginx, run.py) holds a key it made."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.auth import KEY_ID_LEN
from app.key_store import KEY_PREFIX

from .conftest import MADE_KEYS

SECRET_LEN = 43  # secrets.token_urlsafe(32): the part of `ohk_<id>_<secret>` that proves the key
TOKEN_RUN = re.compile(rb"[A-Za-z0-9_-]{%d,}" % SECRET_LEN)  # where a secret could hide, alone or in a key


def secrets_in(data: bytes, secrets: set[bytes]) -> set[bytes]:
    """The secrets that appear anywhere in `data`."""
    found = set()
    for run in TOKEN_RUN.finditer(data):
        text = run.group()
        found.update(text[i:i + SECRET_LEN] for i in range(len(text) - SECRET_LEN + 1)
                     if text[i:i + SECRET_LEN] in secrets)
    return found


def test_secrets_in_finds_a_secret_alone_inside_a_key_and_in_json():
    secret = b"A" * 21 + b"-_" + b"z" * 20
    assert secrets_in(b"x ohk_0123456789abcdef_" + secret + b" y", {secret}) == {secret}
    assert secrets_in(b'{"authorization": "Bearer ' + secret + b'"}', {secret}) == {secret}
    assert secrets_in(b"ohk_0123456789abcdef_" + secret[:-1], {secret}) == set()


@pytest.mark.timeout(300)
def test_no_log_of_this_run_holds_a_key_it_made(tmp_path_factory: pytest.TempPathFactory):
    if len(MADE_KEYS) < 50:
        pytest.skip(f"only {len(MADE_KEYS)} keys made: this audit is for the whole suite's run")
    secrets = {key[len(KEY_PREFIX) + KEY_ID_LEN + 1:].encode() for key in MADE_KEYS}  # ohk_<id>_<secret>
    assert all(len(secret) == SECRET_LEN for secret in secrets)
    base = Path(tmp_path_factory.getbasetemp())
    logs = [path for path in base.rglob("*") if path.is_file() and ".log" in path.name]
    assert len(logs) >= 20, f"only {len(logs)} log files under {base}: the servers' logs moved?"
    leaks = {str(path.relative_to(base)): len(found)
             for path in logs if (found := secrets_in(path.read_bytes(), secrets))}
    assert leaks == {}, f"log files holding a key this run made (file: how many keys): {leaks}"
