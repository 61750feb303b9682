"""What the hub scripts share: a hub of their own and one stream followed through it (gevent patched first)."""
from __future__ import annotations

from dataclasses import dataclass, field

import gevent
import redis

from app import stream
from app.hub import Hub
from app.store import Store
from app.subscriber import Subscriber


@dataclass
class Followed:
    """A conversation ("u1"'s, event 0 "hello") and one stream on it, read into `out`."""

    redis: redis.Redis
    store: Store
    hub: Hub
    cid: str
    sub: Subscriber
    out: list[bytes] = field(default_factory=list)
    reader: gevent.Greenlet | None = None

    def ids(self) -> list[str]:
        """The `id:` lines the stream sent so far."""
        return [line for line in b"".join(self.out).decode().splitlines() if line.startswith("id:")]


def follow_one(url: str) -> Followed:
    """Make the conversation and follow it with a stream that has no socket (the non-direct path)."""
    client = redis.Redis.from_url(url)
    store = Store(client)
    hub = Hub(url, store, queue_max=2000, stream_cap=0)
    cid = store.new_conversation_id()
    store.create_conversation("u1", cid, repository=None, branch=None, title="t", initial_user_msg="hello")
    sub = Subscriber(cid, "u1", "k1", "", -1, None)
    hub.subscribe(sub)
    followed = Followed(client, store, hub, cid, sub)
    followed.reader = gevent.spawn(lambda: followed.out.extend(stream.stream(hub, store, sub, b"", 15.0)))
    gevent.sleep(0.3)
    return followed
