"""The Redis side of agent runs: the work shards (consumer groups) and the run scripts of scripts/.

Every write of a run goes through a script that checks the run's lease (a token per worker and
conversation) and the step it writes, so a worker that lost its lease writes nothing more and a
step is stored once however often it is sent: after a lost reply a write is simply sent again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

from .. import metrics
from ..cluster import pipelines_per_node
from ..keys import (
    AGENT_GROUP,
    agent_work_key,
    conv_channel,
    conv_events_key,
    conv_inbox_key,
    conv_meta_key,
    conv_reply_key,
    conv_run_key,
    event_id_of,
)
from ..store import Store, now_iso, resend_idempotent

SCRIPTS = Path(__file__).resolve().parent / "scripts"
REPLY_TTL = 600  # a reply so far outlives its worker by this long at most (seconds)


def script_source(name: str) -> str:
    """The text of one of the run scripts (scripts/<name>.lua)."""
    return (SCRIPTS / f"{name}.lua").read_text()


class ConversationGone(Exception):
    """The conversation was deleted: its work is dropped."""


class LeaseLost(Exception):
    """Another worker holds the conversation's lease now: this one stops writing at once."""


class RunEnded(Exception):
    """The run was ended already (by this worker before a lost reply, or by another)."""


@dataclass
class Claim:
    """What `acquire` gives a worker that took a conversation's lease: the message to answer, and more."""

    cause: int
    steps_written: int
    stop: bool
    repository: str | None
    selected_branch: str | None
    title: str | None
    history: list[dict[str, Any]]


def _text(value: bytes) -> str | None:
    return value.decode() if value else None


def _result(reply: list[Any]) -> int:
    code = int(reply[0])
    if code == -1:
        raise ConversationGone()
    if code == -3:
        raise LeaseLost()
    if code == -5:
        raise RunEnded()
    if code == -4:
        raise RuntimeError("a step of the run was skipped")  # a bug of the caller: never retried
    return code


def resend(call: Any) -> Any:
    """Run an idempotent script; after a lost or late reply, send it again (it cannot apply twice)."""
    return resend_idempotent(call, attempts=3)


class RunStore:
    """Runs and work shards, on the service's store (its client, retention and publish command)."""

    def __init__(self, store: Store, *, lease_ms: int, history: int):
        self.store = store
        self.redis = store.redis
        self.lease_ms = lease_ms
        self.history = history
        self.shards = store.agent_shards
        self.replicated = store.min_replicas > 0
        self.announced: dict[str, int] = {}  # with REDIS_MIN_REPLICAS_ACK: the last event announced per run
        self._scripts = {name: self.redis.register_script(script_source(name))
                         for name in ("acquire", "emit", "finish", "renew", "release", "delta", "touch")}

    # Runs ----------------------------------------------------------------------------------

    def acquire(self, cid: str, token: str) -> Claim | str:
        """Take the conversation's lease: a Claim, or why not ('gone', 'idle', 'paused', 'busy')."""
        keys = [conv_meta_key(cid), conv_events_key(cid), conv_inbox_key(cid), conv_run_key(cid)]
        reply = resend(lambda: self._scripts["acquire"](keys=keys, args=[token, self.lease_ms, self.history]))
        status = reply[0].decode()
        if status != "ok":
            return status
        history = []
        for entry, fields in reversed(self._pairs(reply[7])):
            data = fields.get(b"e")
            if data is not None:
                event = orjson.loads(data)
                event.setdefault("id", event_id_of(entry))
                history.append(event)
        return Claim(cause=int(reply[1]), steps_written=int(reply[2]), stop=bool(reply[3]),
                     repository=_text(reply[4]), selected_branch=_text(reply[5]), title=_text(reply[6]),
                     history=history)

    @staticmethod
    def _pairs(entries: list[Any]) -> list[tuple[bytes, dict[bytes, bytes]]]:
        # A script's reply holds XREVRANGE's entries as [id, [field, value, ...]].
        out = []
        for entry, flat in entries:
            out.append((entry, dict(zip(flat[::2], flat[1::2]))))
        return out

    def emit(self, cid: str, token: str, cause: int, step: int, fields: dict[str, Any], *, source: str,
             state: str = "", ends_reply: bool = False) -> tuple[int, bool]:
        """Store step `step` of the run answering `cause`, once; (its event id, whether it was stored before)."""
        event = {"timestamp": now_iso(), "source": source, "type": fields["type"], "cause": cause}
        body = orjson.dumps({**event, **fields, "cause": cause})
        keys = [conv_meta_key(cid), conv_events_key(cid), conv_run_key(cid), conv_channel(cid), conv_reply_key(cid)]
        args = [token, cause, step, body[1:], self.store.retention, self._publish_now, state,
                "1" if ends_reply else ""]
        reply = self._write("emit", keys, args)
        event_id = _result(reply)
        self._announce(cid, event_id)
        if not int(reply[1]):
            metrics.EVENTS_APPENDED.labels(source).inc()
        return event_id, bool(int(reply[1]))

    @property
    def _publish_now(self) -> str:
        # With REDIS_MIN_REPLICAS_ACK an event is announced only once replicated (as a post's is).
        return "" if self.replicated else self.store.publish

    def _write(self, name: str, keys: list[str], args: list[Any]) -> Any:
        if not self.replicated:
            return resend(lambda: self._scripts[name](keys=keys, args=args))
        # The script and its WAIT on one connection; fewer replicas than asked: ServiceUnavailable
        # (the run is looked at again later, and the step, stored already, is not stored twice).
        return resend(lambda: self.store._acked(self._scripts[name], keys, args))

    def _announce(self, cid: str, event_id: int) -> None:
        if self.replicated and event_id > 0:
            # A doorbell: every hub following the conversation reads the store up to it.
            self.redis.execute_command(self.store.publish, conv_channel(cid), b"#%d" % event_id)
            self.announced[cid] = event_id

    def delta(self, cid: str, token: str, cause: int, offset: int, byte_offset: int, text: str) -> bool:
        """Publish a live bit of the reply (not stored as an event); False when it was not (sent before, or a gap).

        A gap (the reply so far is shorter than `byte_offset`) is a run taken over mid-reply whose
        new attempt cuts its bits elsewhere: the bit is skipped, the stored message replaces all.
        """
        data = orjson.dumps({"cause": cause, "offset": offset, "text": text})
        keys = [conv_meta_key(cid), conv_reply_key(cid), conv_channel(cid), conv_run_key(cid)]
        # With REDIS_MIN_REPLICAS_ACK, events are announced once replicated: a bit is placed after
        # the last event this run announced, so no stream reads an event a failover may lose.
        after = "" if not self.replicated or self.announced.get(cid) is None else self.announced[cid]
        args = [token, cause, byte_offset, text, data, self.store.publish, REPLY_TTL, after]
        reply = resend(lambda: self._scripts["delta"](keys=keys, args=args))
        return reply != -4 and _result([reply]) == 1

    def finish(self, cid: str, token: str, cause: int, step: int, state: str) -> tuple[bool, str]:
        """End the run: its last state event; (whether more is queued and the lease still ours, the state written)."""
        keys = [conv_meta_key(cid), conv_events_key(cid), conv_run_key(cid), conv_channel(cid),
                conv_reply_key(cid), conv_inbox_key(cid)]
        args = [token, cause, step, now_iso(), state, self.store.retention, self._publish_now, self.lease_ms]
        reply = self._write("finish", keys, args)
        self._announce(cid, _result(reply))
        return bool(int(reply[1])), reply[2].decode()

    def renew(self, leases: list[tuple[str, str]]) -> list[tuple[int, bool]]:
        """Renew (conversation, token) leases, a pipeline per master: (1 held, 0 lost, -1 gone; stop asked)."""
        keys = [conv_meta_key(cid) for cid, _token in leases]
        out: list[tuple[int, bool]] = [(0, False)] * len(leases)
        for client, positions in pipelines_per_node(self.redis, keys).items():
            pipe = client.pipeline(transaction=False)
            for i in positions:
                self._scripts["renew"](keys=[keys[i]], args=[leases[i][1], self.lease_ms], client=pipe)
            for i, reply in zip(positions, pipe.execute()):
                out[i] = (int(reply[0]), len(reply) > 1 and bool(reply[1]))
        return out

    def release(self, cid: str, token: str) -> None:
        """Let the lease go (shutting down): the run is taken over at once by another worker."""
        resend(lambda: self._scripts["release"](keys=[conv_meta_key(cid)], args=[token]))

    # Work shards ---------------------------------------------------------------------------

    def ensure_groups(self) -> None:
        """Create the consumer group on every shard (from the start: entries made before are answered too)."""
        for shard in range(self.shards):
            try:
                self.redis.xgroup_create(agent_work_key(shard), AGENT_GROUP, id="0", mkstream=True)
            except redis.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    @staticmethod
    def _work(entries: list[Any]) -> list[tuple[bytes, str]]:
        return [(entry, fields[b"c"].decode()) for entry, fields in entries if fields and b"c" in fields]

    def read_work(self, client: Any, shard: int, consumer: str, count: int, block_ms: int) -> list[tuple[bytes, str]]:
        """New work entries of a shard for this consumer: (entry id, conversation id)."""
        reply = client.xreadgroup(AGENT_GROUP, consumer, {agent_work_key(shard): ">"}, count=count, block=block_ms)
        return self._work(reply[0][1]) if reply else []

    def claim_idle(self, shard: int, consumer: str, idle_ms: int, count: int,
                   cursor: bytes = b"0-0") -> tuple[bytes, list[tuple[bytes, str]]]:
        """Work entries another consumer took and has not touched for `idle_ms` (it died): now ours.

        Redis looks at no more than 10 x `count` pending entries per call: the cursor it gives back
        goes on from there next time, so idle entries behind many live ones are reached too.
        """
        reply = self.redis.xautoclaim(agent_work_key(shard), AGENT_GROUP, consumer, idle_ms, cursor, count=count)
        return reply[0], self._work(reply[1])

    def touch(self, shard: int, consumer: str, entries: list[bytes]) -> int:
        """Reset the idle time of entries this consumer still holds (not one claimed by another since)."""
        return int(self._scripts["touch"](keys=[agent_work_key(shard)], args=[consumer, *entries]))

    def done(self, shard: int, entries: list[bytes]) -> None:
        """Acknowledge and delete work entries (the shard holds only work not done)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(agent_work_key(shard), AGENT_GROUP, *entries)
        pipe.xdel(agent_work_key(shard), *entries)
        pipe.execute()

    def requeue(self, cid: str) -> None:
        """A new work entry for the conversation (a worker leaving hands its run over at once)."""
        self.store.add_work_entry(cid)
