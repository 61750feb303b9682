"""Conversations, events and idempotency, over the keys of keys.py (API keys and stream leases: key_store.py).

The key names are keys.py's (re-exported here for the modules that import them from the store).
"""
from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis

from . import metrics
from .cluster import run_on_key_node
from .errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from .key_store import KeysAndLeases, now_iso
from .keys import (
    DELETED_NOTICE,
    agent_shard,
    agent_work_key,
    conv_channel,
    conv_events_key,
    conv_inbox_key,
    conv_meta_key,
    conv_run_key,
    conversation_keys,
    entry_id,
    event_id_of,
    idempotency_expiry_key,
    idempotency_key,
    user_conversations_key,
    user_sequence_key,
)
from .lua import (
    APPEND_LUA,
    COMMIT_LUA,
    CREATE_LUA,
    DELETE_LUA,
    INDEX_LUA,
)
from .redis import Client, is_cluster, server_major

log = logging.getLogger(__name__)

# Lua numbers are doubles: ids are exact up to 2^53 (written with %d, not Lua's %.14g). A larger
# id is valid to ask for, and has no events ever.
MAX_EVENT_ID = 2**53 - 1

# A create is made in three steps (the conversation's keys and the owner's index are in different
# slots on a Cluster): until the last one, the conversation is invisible and expires by itself.
CREATE_PENDING_TTL = 60

# Errors after which a command may or may not have run: only an idempotent write is sent again.
MAYBE_RAN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def resend_idempotent(call: Callable[[], Any], attempts: int = 2) -> Any:
    """Run an idempotent write; after a lost or late reply, send it again (it cannot apply twice)."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except MAYBE_RAN:
            if attempt == attempts:
                raise
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable")


# What new_conversation_id makes. Anything else names no conversation, and must not reach Redis:
# a `}` in it would break the key's hash tag (a cross-slot error on a Cluster).
CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _require_id(cid: str) -> None:
    if not CONVERSATION_ID.fullmatch(cid):
        raise NotFound("no such conversation")


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def visible_owner(owner: bytes | None, pending: bytes | None) -> str | None:
    """The owner of a conversation from its meta's `owner` and `pending` fields; None if none, or not created yet."""
    return owner.decode() if owner is not None and pending is None else None


def stored_events(entries: list) -> list[tuple[int, bytes]]:
    """(event id, stored JSON) of the entries an XRANGE of a conversation's events gave.

    An entry not written by us (no event field) is skipped: one bad entry must not stall a stream.
    """
    return [(event_id_of(eid), fields[b"e"]) for eid, fields in entries if b"e" in fields]


class Store(KeysAndLeases):
    """Conversations, events, API keys and stream leases, on one Redis client."""

    def __init__(self, client: Client, *, retention: int = 0, idempotency_ttl: int = 86400,
                 min_replicas: int = 0, replicas_timeout_ms: int = 1000, agent_shards: int = 8):
        super().__init__(client)
        self.agent_shards = agent_shards
        # On a Cluster the work shard is in another slot than the conversation: it is told after.
        self.cluster = is_cluster(client)
        self.min_replicas = min_replicas
        self.replicas_timeout_ms = replicas_timeout_ms
        self._publish: str | None = None if is_cluster(client) else "PUBLISH"
        self.retention = retention
        self.idempotency_ttl = idempotency_ttl
        self._append = client.register_script(APPEND_LUA)
        self._create = client.register_script(CREATE_LUA)
        self._index = client.register_script(INDEX_LUA)
        self._commit = client.register_script(COMMIT_LUA)
        self._delete = client.register_script(DELETE_LUA)

    @property
    def publish(self) -> str:
        """How events are announced: SPUBLISH on a Redis 7+ Cluster (to the channel's shard only), else PUBLISH."""
        if self._publish is None:  # asked once, on first use: Redis may be down when the worker starts
            self._publish = "SPUBLISH" if server_major(self.redis) >= 7 else "PUBLISH"
        return self._publish

    # Conversations ------------------------------------------------------------------------

    @staticmethod
    def new_conversation_id() -> str:
        """An unguessable conversation id (192 random bits, URL-safe)."""
        return secrets.token_urlsafe(24)

    def create_conversation(
        self, owner: str, cid: str, *, repository: str | None, branch: str | None, title: str,
        initial_user_msg: str | None,
    ) -> None:
        """Create a conversation (with its first user message as event 0).

        Three idempotent steps, each safe to re-run: the conversation (invisible, expiring), the
        owner's index, then the commit that makes it visible. Cut off before the commit, what was
        made expires within CREATE_PENDING_TTL and the index entry is dropped by the next listing.
        """
        meta: list[Any] = ["owner", owner, "title", title, "created_at", now_iso(), "last_event_id", -1]
        if repository is not None:
            meta += ["repository", repository]
        if branch is not None:
            meta += ["selected_branch", branch]
        first = self._event_json({"type": "user_message", "content": initial_user_msg}, "user") if initial_user_msg \
            else b"{"
        keys = [conv_meta_key(cid), conv_events_key(cid), conv_inbox_key(cid)]
        index = [user_sequence_key(owner), user_conversations_key(owner)]
        resend_idempotent(lambda: self._create(keys=keys, args=[CREATE_PENDING_TTL, first[1:], *meta]))
        if initial_user_msg:
            metrics.EVENTS_APPENDED.labels("user").inc()
        resend_idempotent(lambda: self._index(keys=index, args=[cid]))
        commit_keys = keys if self.cluster else [*keys, agent_work_key(agent_shard(cid, self.agent_shards))]
        try:
            committed = resend_idempotent(lambda: self._acked(self._commit, commit_keys, [owner, cid]))
        except MAYBE_RAN:
            # The client is answered 503 and never learns this id: undo, so that its retry does not
            # make a second conversation (if this fails too, an uncommitted one expires by itself).
            try:
                self.delete_conversation(owner, cid)
            except (redis.RedisError, NotFound):
                pass
            raise
        if not committed:
            self.redis.zrem(user_conversations_key(owner), cid)
            raise ServiceUnavailable("the conversation could not be created in time; retry",
                                     code="redis_unavailable", headers={"Retry-After": "1"})
        if initial_user_msg and self.cluster:
            self.tell_agents(cid)

    def tell_agents(self, cid: str) -> None:
        """Add an entry to the conversation's agent work shard: some worker looks at what it has queued.

        An extra entry answers nothing twice (the worker finds nothing queued, or the run going), so
        it is re-sent after a lost reply. Only needed on a Cluster: elsewhere the scripts add it.
        """
        try:
            resend_idempotent(lambda: self.add_work_entry(cid))
        except redis.RedisError as err:
            # The message is stored and queued in its conversation: the next one posted there brings
            # the agents to both. Failing the post would make a client without an Idempotency-Key
            # post it twice.
            log.warning("could not tell the agents about conversation %s (%s)", cid, type(err).__name__)

    def add_work_entry(self, cid: str) -> None:
        """One entry `c=<cid>` on the conversation's agent work shard (a worker will look at its inbox)."""
        self.redis.xadd(agent_work_key(agent_shard(cid, self.agent_shards)), {"c": cid})

    @staticmethod
    def _visible(meta: dict[bytes, bytes], owner: str) -> bool:
        return bool(meta) and meta.get(b"owner", b"").decode() == owner and b"pending" not in meta

    def _check_owner(self, meta: dict[bytes, bytes], owner: str) -> None:
        if not self._visible(meta, owner):
            raise NotFound("no such conversation")

    def _acked(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a write script; with REDIS_MIN_REPLICAS_ACK, only answer once that many replicas have it.

        WAIT on the script's own connection (a pipeline keeps them together) covers everything the
        master wrote before, whoever wrote it: replication is one ordered stream.
        """
        if not self.min_replicas:
            return script(keys=keys, args=args)

        def build(pipe: Any) -> None:
            script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self.min_replicas, self.replicas_timeout_ms)

        result, acked = run_on_key_node(self.redis, keys[0], build)
        if acked < self.min_replicas and not (isinstance(result, list) and result[0] == -1):
            raise ServiceUnavailable(
                f"stored, but {acked} of the {self.min_replicas} replicas required confirmed it within "
                f"{self.replicas_timeout_ms} ms; retry (with the same Idempotency-Key for an action)",
                code="redis_not_replicated", headers={"Retry-After": "1"})
        return result

    def get_conversation(self, owner: str, cid: str) -> dict[str, Any]:
        """The conversation as API.md shows it; NotFound if missing or another user's."""
        _require_id(cid)
        meta = self.redis.hgetall(conv_meta_key(cid))
        self._check_owner(meta, owner)
        return self._public(cid, meta)

    @staticmethod
    def _public(cid: str, meta: dict[bytes, bytes]) -> dict[str, Any]:
        return {
            "conversation_id": cid,
            "repository": _text(meta.get(b"repository")),
            "selected_branch": _text(meta.get(b"selected_branch")),
            "title": _text(meta.get(b"title")),
            "created_at": _text(meta.get(b"created_at")),
            "last_event_id": int(meta.get(b"last_event_id", b"-1")),
            "agent_state": _text(meta.get(b"agent_state")),
        }

    def list_conversations(self, owner: str, limit: int, before: int | None) -> tuple[list[dict], int | None]:
        """A page of the owner's conversations, newest first, and the cursor of the next page."""
        index = user_conversations_key(owner)
        high = f"({before}" if before is not None else "+inf"
        rows = self.redis.zrevrangebyscore(index, high, "-inf", start=0, num=limit + 1, withscores=True)
        page, more = rows[:limit], len(rows) > limit
        pipe = self.redis.pipeline(transaction=False)
        for member, _score in page:
            pipe.hgetall(conv_meta_key(member.decode()))
        results, gone = [], []
        for (member, _score), meta in zip(page, pipe.execute()):
            cid = member.decode()
            if self._visible(meta, owner):
                results.append(self._public(cid, meta))
            elif not meta:  # deleted between the index read and the meta read, or a create cut off
                gone.append(member)
        if gone:
            self.redis.zrem(index, *gone)
        next_page = int(page[-1][1]) if more and page else None
        return results, next_page

    def delete_conversation(self, owner: str, cid: str) -> None:
        """Delete the owner's conversation, every key of it, and its index entry; NotFound otherwise."""
        _require_id(cid)
        keys = [*conversation_keys(cid), conv_channel(cid)]
        deleted = resend_idempotent(lambda: self._delete(keys=keys, args=[owner, self.publish, DELETED_NOTICE]))
        # Still in the owner's index after the keys are gone: a retry of a delete whose answer was
        # lost (or a create cut off). It was theirs and it is gone now, which is what they asked.
        unindexed = resend_idempotent(lambda: self.redis.zrem(user_conversations_key(owner), cid))
        if not deleted and not unindexed:
            raise NotFound("no such conversation")

    def conversation_owner(self, cid: str) -> str | None:
        """The owner of a visible conversation, or None when there is none."""
        if not CONVERSATION_ID.fullmatch(cid):
            return None
        return visible_owner(*self.redis.hmget(conv_meta_key(cid), "owner", "pending"))

    # Events -------------------------------------------------------------------------------

    @staticmethod
    def _event_json(fields: dict[str, Any], source: str) -> bytes:
        # Made here, in posted field order; the scripts splice the id in front.
        try:
            return orjson.dumps({"timestamp": now_iso(), "source": source, **fields})
        except orjson.JSONEncodeError as err:  # lone surrogates, nesting deeper than 254
            raise BadRequest(f"the action cannot be stored as JSON: {err}", code="invalid_json") from None

    def append_event(
        self,
        owner: str | None,
        cid: str,
        fields: dict[str, Any],
        *,
        source: str,
        idempotency: tuple[str, str] | None = None,
        agent_kind: str = "",
    ) -> tuple[int, bool]:
        """Append an event atomically; return (event id, whether it is a replayed answer).

        `owner` None skips the ownership check. `idempotency` is (hashed Idempotency-Key, digest of
        the body). `agent_kind`: 'message' queues it for an agent's answer, 'stop' ends the run going.
        """
        _require_id(cid)
        idem_key, digest = idempotency if idempotency else ("", "")
        keys = [conv_meta_key(cid), conv_events_key(cid), idempotency_key(cid), idempotency_expiry_key(cid),
                conv_channel(cid), conv_inbox_key(cid), conv_run_key(cid)]
        if not self.cluster:
            keys.append(agent_work_key(agent_shard(cid, self.agent_shards)))
        body = self._event_json(fields, source)
        # With REDIS_MIN_REPLICAS_ACK the event is announced only once replicated (below): a stream
        # must never show an event that a failover then loses, whose id a later event would reuse.
        announce_here = "" if self.min_replicas else self.publish
        args = [owner or "", body[1:], self.retention, idem_key, self.idempotency_ttl, digest, announce_here,
                agent_kind, cid]
        # With an Idempotency-Key the append is answered from its record when it ran already, so a
        # lost reply is resent; without one it may run twice: the caller gets its 503 instead.
        append = lambda: self._acked(self._append, keys, args)  # noqa: E731
        result = resend_idempotent(append) if idempotency else append()
        if result[0] == -1:
            raise NotFound("no such conversation")
        if result[0] == -2:
            prev_id, _, prev_digest = result[1].decode().partition(":")
            if idempotency and prev_digest != idempotency[1]:
                raise Conflict("this Idempotency-Key was already used for another request body")
            if self.min_replicas:  # its first answer may have been a 503 that announced nothing
                self.redis.execute_command(self.publish, conv_channel(cid), b"#%d" % int(prev_id))
            if agent_kind == "message" and self.cluster:  # the first attempt may have died before telling
                self.tell_agents(cid)
            return int(prev_id), True
        if self.min_replicas:
            event_id = int(result[0])
            self.redis.execute_command(self.publish, conv_channel(cid), b'{"id":%d,%s' % (event_id, body[1:]))
        if len(result) > 1 and self.cluster:  # the script says the agents must be told
            self.tell_agents(cid)
        metrics.EVENTS_APPENDED.labels(source).inc()
        return int(result[0]), False

    def list_events(self, owner: str, cid: str, start_id: int, limit: int) -> tuple[list[bytes], bool]:
        """Stored event JSON from `start_id` on (at most `limit`) and whether more follow; NotFound if not `owner`'s."""
        if self.conversation_owner(cid) != owner:
            raise NotFound("no such conversation")
        return self.events_page(cid, start_id, limit)

    def events_page(self, cid: str, start_id: int, limit: int) -> tuple[list[bytes], bool]:
        """Stored event JSON from `start_id` on (at most `limit`), whether more follow; the owner is checked already."""
        if start_id > MAX_EVENT_ID:  # nothing is past the largest possible id (and Redis would refuse the entry id)
            return [], False
        # The conversation's meta with the page (one round trip, one slot): deleted since the owner
        # was read, it is a 404, not an empty page that says there is nothing more.
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrange(conv_events_key(cid), min=entry_id(start_id), max="+", count=limit + 1)
        pipe.exists(conv_meta_key(cid))
        entries, exists = pipe.execute()
        if not exists:
            raise NotFound("no such conversation")
        return [fields[b"e"] for _eid, fields in entries[:limit] if b"e" in fields], len(entries) > limit

    def read_after(self, cid: str, after_id: int, count: int) -> list[tuple[int, bytes]]:
        """Up to `count` events after `after_id`, as (event id, stored JSON)."""
        if after_id >= MAX_EVENT_ID:
            return []
        return stored_events(self.redis.xrange(conv_events_key(cid), min=entry_id(after_id + 1), max="+", count=count))
