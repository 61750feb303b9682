"""Under gevent: an event and the conversation's deletion announced in one read; prints JSON of the stream."""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402

from app.store import DELETED_NOTICE, conv_channel, conversation_keys  # noqa: E402
from tests.scripts.hub_kit import follow_one  # noqa: E402

url = sys.argv[1]
kit = follow_one(url)
r, store, cid, sub = kit.redis, kit.store, kit.cid, kit.sub
pipe = r.pipeline(transaction=True)  # both in one MULTI: both announcements arrive in one read
body = store._event_json({"type": "x", "n": 1}, "agent")
keys = [*conversation_keys(cid), conv_channel(cid)]
append_keys = [*conversation_keys(cid)[:4], conv_channel(cid)]  # the append script's KEYS, by position
store._append(keys=append_keys, args=["u1", body[1:], 0, "", 86400, "", "PUBLISH", "", cid], client=pipe)
store._delete(keys=keys, args=["u1", "PUBLISH", DELETED_NOTICE], client=pipe)
answers = pipe.execute()
kit.reader.join(timeout=5)
print(json.dumps({"answers": [str(a) for a in answers], "end_reason": sub.end_reason, "ids": kit.ids()}))
