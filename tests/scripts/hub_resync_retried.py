"""Under gevent: the first read after a pub/sub reconnect fails (as -LOADING would); prints JSON of what arrived."""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402

from tests.scripts.hub_kit import follow_one  # noqa: E402

url = sys.argv[1]
kit = follow_one(url)
r, store, hub, cid, sub = kit.redis, kit.store, kit.hub, kit.cid, kit.sub
real, failures = hub._control.pipeline, []


class FailingOnce:
    """A pipeline whose first execute fails as a Redis still loading its data would answer."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def execute(self):
        if not failures:
            failures.append(1)
            raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")
        return self.pipe.execute()


hub._control.pipeline = lambda **kw: FailingOnce(real(**kw))
r.client_kill_filter(_type="pubsub")
store.append_event("u1", cid, {"type": "x", "n": 1}, source="agent")  # announced while not subscribed
for _ in range(100):
    if sub.last_sent == 1:
        break
    gevent.sleep(0.05)
print(json.dumps({"failures": len(failures), "last_sent": sub.last_sent, "ids": kit.ids()}))
