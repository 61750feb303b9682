"""schemathesis against a real gunicorn: no 500 anywhere, and every answer as /api/openapi.json documents it."""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The answer checks: nothing a 500, and every status, content type, header and body as documented.
# Also: an undocumented method is a 405 with Allow, a missing credential a 401, a deleted
# conversation stays gone.
CHECKS = ",".join((
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance",
    # The document's rules are the server's: what they allow is taken, what they refuse is a 4xx.
    "positive_data_acceptance", "negative_data_rejection",
    "unsupported_method", "allow_header_conformance", "missing_required_header", "ignored_auth", "use_after_free",
    "ensure_resource_availability",
))
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "30"))
# Fixed, so a CI run is reproducible; SCHEMATHESIS_SEED=random (or a number) tries other inputs.
SEED = os.environ.get("SCHEMATHESIS_SEED", "20261201")

ACCESS_LINE = re.compile(r"app\.request: (\S+ \S+) (\d{3}) ")
CONFIG = """
headers = { Authorization = "Bearer ${OH_SCHEMATHESIS_KEY}" }
request-timeout = 10
workers = 1

[phases.stateful]
max-steps = 8
generation = { max-examples = 12 }

# A stream never ends by itself: read its opening and what is stored (a few events), then hang up
# (each stream answered 200 costs this long; its head must come sooner, on a loaded box too).
[[operations]]
include-operation-id = "streamEvents"
request-timeout = 1.5
max-stream-events = 5
"""


def run_schemathesis(base: str, key: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    """`schemathesis run` on the server's own document; its output and exit code."""
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    seed = [] if SEED == "random" else ["--seed", SEED]
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "--no-color", "--config-file", str(config), "run",
        f"{base}/api/openapi.json", "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), *seed,
        "--suppress-health-check", "too_slow",
    ]
    # The key goes in the environment (the config reads it), never on a command line others can read.
    env = {**os.environ, "OH_SCHEMATHESIS_KEY": key}
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=150)


@pytest.mark.timeout(200)
def test_schemathesis_finds_no_server_error_and_no_answer_unlike_the_document(start_server, make_key, tmp_path):
    # Rate limits on, low enough that some posts and stream opens get their 429 (documented too).
    server = start_server(SSE_HEARTBEAT_SECONDS="0.2", POST_RATE_LIMIT="300", STREAM_RATE_LIMIT="40")
    result = run_schemathesis(server.base, make_key("schemathesis"), tmp_path)
    print(result.stdout[-6000:])
    statuses = collections.Counter(status for _route, status in ACCESS_LINE.findall(server.log()))
    print("statuses the server answered:", dict(sorted(statuses.items())))
    assert result.returncode == 0, result.stdout[-30000:] + result.stderr[-5000:]
    # schemathesis saw no 500; nor did the server answer one to any request (its access log says).
    answered = ACCESS_LINE.findall(server.log())
    assert len(answered) > 500, "the access log lost its request lines?"
    assert [line for line in answered if line[1].startswith("5")] == []
