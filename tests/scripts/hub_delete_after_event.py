"""Under gevent: an event and the conversation's deletion announced in one read; prints JSON of the stream."""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402

from app import stream  # noqa: E402
from app.hub import Hub  # noqa: E402
from app.store import DELETED_NOTICE, Store, conv_channel, conversation_keys  # noqa: E402
from app.subscriber import Subscriber  # noqa: E402

url = sys.argv[1]
r = redis.Redis.from_url(url)
store = Store(r)
hub = Hub(url, store, queue_max=2000, stream_cap=0)
cid = store.new_conversation_id()
store.create_conversation("u1", cid, repository=None, branch=None, title="t", initial_user_msg="hello")
sub = Subscriber(cid, "u1", "k1", "", -1, None)  # no direct writes: the TLS / HTTP/1.0 path
hub.subscribe(sub)
out: list[bytes] = []
done = gevent.spawn(lambda: out.extend(stream.stream(hub, store, sub, b"", 15.0)))
gevent.sleep(0.3)
pipe = r.pipeline(transaction=True)  # both in one MULTI: both announcements arrive in one read
body = store._event_json({"type": "x", "n": 1}, "agent")
keys = [*conversation_keys(cid), conv_channel(cid)]
store._append(keys=keys, args=["u1", body[1:], 0, "", 86400, "", "PUBLISH"], client=pipe)
store._delete(keys=keys, args=["u1", "PUBLISH", DELETED_NOTICE], client=pipe)
answers = pipe.execute()
done.join(timeout=5)
print(json.dumps({"answers": [str(a) for a in answers], "end_reason": sub.end_reason,
                  "ids": [line for line in b"".join(out).decode().splitlines() if line.startswith("id:")]}))
