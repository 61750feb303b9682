"""Under gevent: the hub's pub/sub connection cut while busy, channels followed meanwhile; prints JSON."""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402

from app.broker import Listener  # noqa: E402

url = sys.argv[1]
r = redis.Redis.from_url(url)
got: list = []
slow = {"on": False}
reconnects = []


def on_messages(batch):
    got.extend(batch)
    if slow["on"]:
        slow["on"] = False
        gevent.sleep(1.5)  # as a gap fill's round trip or the coalescing pause would


listener = Listener(url, on_messages=on_messages, on_subscribed=lambda c: None,
                    on_reconnected=lambda: reconnects.append(1))
for i in range(5):
    listener.follow(b"ch%d" % i)


def until(check, timeout):
    for _ in range(int(timeout / 0.05)):
        if check():
            return True
        gevent.sleep(0.05)
    return False


assert until(lambda: listener.confirmed, 5)
slow["on"] = True
r.publish("ch0", "x")  # the read greenlet now sits in on_messages for 1.5 s
gevent.sleep(0.1)
hub = [c for c in r.client_list() if c["name"].endswith("hub-pubsub")][0]
r.client_kill_filter(_id=hub["id"])
gevent.sleep(0.05)
for i in range(5, 9):  # streams come and go meanwhile: the write loop sends
    listener.follow(b"ch%d" % i)
    gevent.sleep(0.15)
until(lambda: listener.confirmed and reconnects, 10)
got.clear()
for i in range(9):
    r.publish(f"ch{i}", f"after{i}")
until(lambda: len(got) >= 9, 5)
print(json.dumps({
    "reconnects": len(reconnects),
    "confirmed": listener.confirmed,
    "received": sorted(channel.decode() for channel, _data in got),
    "pubsub_clients": len([c for c in r.client_list() if c["name"].endswith("hub-pubsub")]),
}))
