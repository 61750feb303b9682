"""Clients for the fault tests: followers resuming with Last-Event-ID, posters retrying with one Idempotency-Key."""
from __future__ import annotations

import json
import secrets
import threading
import time
import urllib.request

from .conftest import Api, bearer
from .sse_client import open_stream
from .test_metrics import scrape, value

SSE = "/api/sse/conversations/{}/events"


def own_key(redis_url: str, user_id: str = "alice") -> str:
    """An API key made straight in the Redis at `redis_url` (a Redis of the test's own)."""
    from app import create_app
    from app.redis import close

    keys_app = create_app({"REDIS_URL": redis_url})
    try:
        return keys_app.extensions["store"].create_api_key(user_id)[1]
    finally:
        close(keys_app.extensions["redis"])


def open_streams(base: str) -> float:
    """Streams open over every live worker (/metrics), 0 if no worker answers."""
    try:
        return value(scrape(base + "/metrics"), "openhands_open_streams")
    except OSError:
        return 0


def worker_pid(base: str) -> int:
    """The pid of whichever worker answers /healthz."""
    with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
        return json.loads(resp.read())["worker_pid"]


class Follower(threading.Thread):
    """A client of one conversation that resumes with Last-Event-ID whenever its stream ends, as EventSource does.

    A refused connection or a non-200 answer is retried after Retry-After (at most 1 s); a stream
    silent for `silence` seconds (the heartbeat is 1 s) counts as dead and is reopened.
    """

    def __init__(self, port: int, cid: str, key: str, want: int, deadline: float = 60.0, silence: float = 5.0):
        super().__init__(daemon=True)
        self.port, self.cid, self.key, self.want = port, cid, key, want
        self.deadline, self.silence = deadline, silence
        self.ids: list[int] = []
        self.received: dict[int, float] = {}  # event id -> monotonic time it arrived
        self.opens = 0  # streams answered 200
        self.refusals: list[int] = []  # statuses of answers that were not 200 (0: no connection)
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.deadline
        try:
            while len(self.ids) < self.want and time.monotonic() < deadline:
                self._follow_once()
        except BaseException as err:  # reported by the test
            self.error = err

    def _follow_once(self) -> None:
        last = self.ids[-1] if self.ids else -1
        try:
            stream = open_stream(self.port, SSE.format(self.cid), {**bearer(self.key), "Last-Event-ID": str(last)},
                                 timeout=5)
        except OSError:
            self.refusals.append(0)
            time.sleep(0.2)
            return
        if stream.status != 200:
            self.refusals.append(stream.status)
            time.sleep(min(float(stream.headers.get("retry-after", "1")), 1.0))
            return
        self.opens += 1
        try:
            for ev in stream.events(timeout=self.silence):
                if ev.event == "message" and ev.id is not None:
                    self.ids.append(int(ev.id))
                    self.received[int(ev.id)] = time.monotonic()
                if len(self.ids) >= self.want:
                    break
        finally:
            stream.close()


class Poster(threading.Thread):
    """Posts `count` user messages `pause` apart, each retried with the same Idempotency-Key until acknowledged.

    A 503 is waited out for its Retry-After (at most 1 s); a lost connection or reply is retried at
    once. `acked[n]` is post n's event id; `failures` every answer that was not a 200 (0: none came).
    """

    def __init__(self, api: Api, cid: str, count: int, pause: float, deadline: float = 60.0, size: int = 0):
        super().__init__(daemon=True)
        self.api, self.cid, self.count, self.pause, self.deadline = api, cid, count, pause, deadline
        self.padding = "x" * size
        self.tag = secrets.token_hex(4)  # two posters on one conversation never share a key
        self.acked: dict[int, int] = {}
        self.sent_at: dict[int, float] = {}  # event id -> monotonic time its post was first sent
        self.failures: list[tuple[int, dict]] = []  # (status, headers)
        self.error: BaseException | None = None

    def content(self, n: int) -> str:
        """The content of post n."""
        return f"{self.cid[:8]} m{n} {self.padding}".rstrip()

    def run(self) -> None:
        try:
            for n in range(self.count):
                self.acked[n] = self.post(n)
                time.sleep(self.pause)
        except BaseException as err:  # reported by the test
            self.error = err

    def post(self, n: int) -> int:
        """Post n until acknowledged; its event id."""
        deadline = time.monotonic() + self.deadline
        first = time.monotonic()
        path = f"/api/conversations/{self.cid}/events"
        while time.monotonic() < deadline:
            try:
                action = {"type": "user_message", "content": self.content(n)}
                status, body, headers = self.api.call("POST", path, action,
                                                      headers={"Idempotency-Key": f"{self.tag}-{n}"})
            except OSError:
                self.failures.append((0, {}))
                time.sleep(0.05)
                continue
            if status == 200:
                self.sent_at[body["event_id"]] = first
                return body["event_id"]
            self.failures.append((status, headers))
            if status != 503:
                raise AssertionError(f"post {n}: {status} {body}")
            time.sleep(min(float(headers.get("Retry-After", "1")), 1.0))
        raise TimeoutError(f"post {n} never acknowledged")


def check_followers(followers: list[Follower], want: dict[str, int]) -> None:
    """Every follower ended and holds its conversation's events 0..want-1, each once, in order."""
    for f in followers:
        f.join(90)
    for f in followers:
        assert not f.is_alive(), "a follower never got every event"
        assert f.error is None, repr(f.error)
        assert f.ids == list(range(want[f.cid])), f"{f.ids[:5]}... ({len(f.ids)}), want {want[f.cid]}"
