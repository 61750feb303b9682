"""Does another user's conversation id answer in the time a missing one does? Measured over a real gunicorn.

Starts its own redis-server and gunicorn (gevent worker), makes alice's conversation, and has bob
ask for it and for ids stored nowhere, route by route, the two kinds interleaved in random order on
one kept-alive connection (so drift and noise hit both alike). Per route: medians and p90 of each,
the difference of medians with a bootstrap 95% interval, and a two-sided Mann-Whitney U test
(normal approximation). Timing is reported, never asserted (tests/test_auth.py checks the answers
are byte-identical).

Usage: .venv/bin/python bench/isolation_timing.py [--rounds 400] [--events 200] [--streaming] [--out FILE]
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import create_app  # noqa: E402
from app.redis import close  # noqa: E402
from app.store import Store  # noqa: E402
from tests.servers import Gunicorn, RedisServer  # noqa: E402

SSE = "/api/sse/conversations/{cid}/events"
ROUTES: list[tuple[str, str, str, dict[str, str], bytes | None]] = [  # name, method, path, headers, body
    ("GET conversation", "GET", "/api/conversations/{cid}", {}, None),
    ("DELETE conversation", "DELETE", "/api/conversations/{cid}", {}, None),
    ("POST event", "POST", "/api/conversations/{cid}/events", {"Content-Type": "application/json"},
     b'{"type": "user_message", "content": "hi"}'),
    ("POST event + Idempotency-Key", "POST", "/api/conversations/{cid}/events",
     {"Content-Type": "application/json", "Idempotency-Key": "k1"}, b'{"type": "user_message", "content": "hi"}'),
    ("GET events", "GET", "/api/conversations/{cid}/events", {}, None),
    ("GET SSE stream", "GET", SSE, {}, None),
    ("HEAD SSE stream", "HEAD", SSE, {}, None),
]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def mann_whitney(a: list[float], b: list[float]) -> tuple[float, float]:
    """U of `a` and the two-sided p-value (normal approximation with tie correction)."""
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks = [0.0] * len(pooled)
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        ties += (j - i + 1) ** 3 - (j - i + 1)
        i = j + 1
    n1, n2 = len(a), len(b)
    u = sum(r for r, (_, group) in zip(ranks, pooled) if group == 0) - n1 * (n1 + 1) / 2
    n = n1 + n2
    sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
    z = (u - n1 * n2 / 2) / sigma if sigma else 0.0
    return u, math.erfc(abs(z) / math.sqrt(2))


def bootstrap_median_difference(a: list[float], b: list[float], resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of median(a) - median(b)."""
    rng = random.Random(1)
    diffs = sorted(statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
                   for _ in range(resamples))
    return diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples) - 1]


def timed(conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str],
          body: bytes | None) -> tuple[float, int]:
    """Milliseconds from sending the request to reading the whole answer, and its status."""
    started = time.perf_counter()
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    return (time.perf_counter() - started) * 1000, response.status


def main() -> None:
    """Run the measurement and print (and save) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400, help="requests of each kind per route")
    parser.add_argument("--events", type=int, default=200, help="events (1 KB each) in alice's conversation")
    parser.add_argument("--streaming", action="store_true",
                        help="alice streams her conversation meanwhile (the worker follows it: its open prefetches)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "isolation_timing.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="isolation-"))
    redis_server = RedisServer(work).start()
    # Rate limits off: thousands of 404s from one key in a minute would be 429s (the limits run before the lookup).
    server = Gunicorn(redis_server.url, workers=1, LOG_LEVEL="error", LOG_FORMAT="json", POST_RATE_LIMIT="0",
                      STREAM_RATE_LIMIT="0")
    app = create_app({"REDIS_URL": redis_server.url})
    try:
        server.start(work / "gunicorn.log")
        store = app.extensions["store"]
        alice, bob = store.create_api_key("alice")[1], store.create_api_key("bob")[1]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/api/conversations", body=b'{"initial_user_msg": "secret"}',
                     headers={"Authorization": f"Bearer {alice}", "Content-Type": "application/json"})
        theirs = json.loads(conn.getresponse().read())["conversation_id"]
        for n in range(args.events):  # a full conversation: a read of it would cost more than one of nothing
            conn.request("POST", f"/api/conversations/{theirs}/events", headers={
                "Authorization": f"Bearer {alice}", "Content-Type": "application/json"},
                body=json.dumps({"type": "user_message", "content": f"{n} " + "x" * 1000}).encode())
            conn.getresponse().read()
        auth = {"Authorization": f"Bearer {bob}"}
        if args.streaming:
            stream = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            stream.sendall(f"GET {SSE.format(cid=theirs)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n"
                           "Accept: text/event-stream\r\n\r\n".encode())
            assert stream.recv(65536).startswith(b"HTTP/1.1 200"), "alice's stream did not open"
        rng = random.Random(7)
        samples: dict[str, dict[str, list[float]]] = {name: {"other": [], "missing": []} for name, *_ in ROUTES}
        for _warm in range(20):
            for _name, method, path, headers, body in ROUTES:
                timed(conn, method, path.format(cid=theirs), {**auth, **headers}, body)
        for _round in range(args.rounds):
            order = [(route, kind) for route in ROUTES for kind in ("other", "missing")]
            rng.shuffle(order)
            for (name, method, path, headers, body), kind in order:
                cid = theirs if kind == "other" else Store.new_conversation_id()
                ms, status = timed(conn, method, path.format(cid=cid), {**auth, **headers}, body)
                assert status == 404, (name, kind, status)
                samples[name][kind].append(ms)
        conn.close()
    finally:
        server.stop()
        redis_server.stop()
        close(app.extensions["redis"])
    report = {"rounds": args.rounds, "events": args.events, "streaming": args.streaming, "routes": {}}
    print(f"{'route':<30} {'other p50':>9} {'missing p50':>11} {'other p90':>9} {'missing p90':>11} "
          f"{'diff p50 [95% CI] ms':>28} {'MW p':>7}")
    for name, kinds in samples.items():
        other, missing = kinds["other"], kinds["missing"]
        low, high = bootstrap_median_difference(other, missing)
        _u, p = mann_whitney(other, missing)
        row = {"other_p50_ms": statistics.median(other), "missing_p50_ms": statistics.median(missing),
               "other_p90_ms": percentile(other, 90), "missing_p90_ms": percentile(missing, 90),
               "median_difference_ms": statistics.median(other) - statistics.median(missing),
               "median_difference_ci95_ms": [low, high], "mann_whitney_p": p}
        report["routes"][name] = row
        print(f"{name:<30} {row['other_p50_ms']:>9.3f} {row['missing_p50_ms']:>11.3f} {row['other_p90_ms']:>9.3f} "
              f"{row['missing_p90_ms']:>11.3f} {row['median_difference_ms']:>+8.3f} [{low:+.3f}, {high:+.3f}]"
              f"{p:>9.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
