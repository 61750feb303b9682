"""What the failover tests share: a poster that retries each action until it is acknowledged, and resuming readers."""
from __future__ import annotations

import threading
import time

from .conftest import Api, bearer
from .sse_client import open_stream

SSE = "/api/sse/conversations/{}/events"


def post_with_retries(api: Api, cid: str, total: int, acked: dict[int, int],
                      refused: list[tuple[float, int, str]]) -> None:
    """Post `total` actions in order, each retried with its Idempotency-Key until it is answered 200."""
    started = time.monotonic()
    deadline = started + 150  # a failover takes seconds; a loaded machine may stretch it
    for i in range(total):
        while time.monotonic() < deadline:
            try:
                status, body, _ = api.call("POST", f"/api/conversations/{cid}/events",
                                           {"type": "user_message", "content": f"m{i}"}, {"Idempotency-Key": f"e{i}"})
            except OSError as err:
                status, body = 0, {"error": type(err).__name__}
            if status == 200:
                acked[i] = body["event_id"]
                break
            refused.append((round(time.monotonic() - started, 2), status, str((body or {}).get("error"))))
            time.sleep(0.1)
        time.sleep(0.02)


class Follower:
    """A stream read in a thread; it resumes with Last-Event-ID if the stream ends."""

    def __init__(self, port: int, cid: str, key: str):
        self.port, self.cid, self.key = port, cid, key
        self.ids: list[int] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            headers = bearer(self.key)
            if self.ids:
                headers["Last-Event-ID"] = str(self.ids[-1])
            try:
                stream = open_stream(self.port, SSE.format(self.cid), headers)
            except OSError:
                time.sleep(0.2)
                continue
            if stream.status != 200:
                stream.close()
                time.sleep(0.2)
                continue
            for ev in stream.events(timeout=1.0):
                if ev.id is not None:
                    self.ids.append(int(ev.id))
                if self._stop.is_set():
                    break
            stream.close()

    def stop(self) -> None:
        """Stop reading."""
        self._stop.set()
        self._thread.join(10)
