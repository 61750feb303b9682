"""Every Redis key name, channel and queue of the service, in one place.

Keys carry a hash tag per conversation (``{<id>}``), per user, per API key or per agent work
shard, so each script touches one slot (Redis Cluster). Event ``n`` of a conversation is the stream
entry ``{n+1}-0`` of ``conv:{<id>}:events``, so "every event after n" is one ``XRANGE``/``XREAD``
from a computed id, with no lookup.
"""
from __future__ import annotations

import zlib


def conv_meta_key(cid: str) -> str:
    """Hash of a conversation's metadata (owner, title, last_event_id, ...)."""
    return f"conv:{{{cid}}}:meta"


def conv_events_key(cid: str) -> str:
    """Stream of a conversation's events."""
    return f"conv:{{{cid}}}:events"


def idempotency_key(cid: str) -> str:
    """Hash of the remembered answers to POSTs made with an Idempotency-Key (hashed key -> answer)."""
    return f"conv:{{{cid}}}:idem"


def idempotency_expiry_key(cid: str) -> str:
    """Sorted set of when each remembered answer expires (hashed key -> unix time)."""
    return f"conv:{{{cid}}}:idem:exp"


def conv_channel(cid: str) -> str:
    """Pub/sub channel on which each new event of a conversation is announced (not a key)."""
    return f"conv:{{{cid}}}:live"


# Announced on a conversation's channel when it is deleted: its streams end at once.
DELETED_NOTICE = b"deleted"


def conversation_keys(cid: str) -> list[str]:
    """Every key that holds something of a conversation (deleting them deletes it)."""
    return [conv_meta_key(cid), conv_events_key(cid), idempotency_key(cid), idempotency_expiry_key(cid),
            conv_inbox_key(cid), conv_run_key(cid), conv_reply_key(cid)]


def user_conversations_key(uid: str) -> str:
    """Sorted set of a user's conversation ids, scored by creation sequence."""
    return f"user:{{{uid}}}:convs"


def user_sequence_key(uid: str) -> str:
    """Counter that orders a user's conversations."""
    return f"user:{{{uid}}}:seq"


def user_keys_key(uid: str) -> str:
    """Set of a user's API key ids."""
    return f"user:{{{uid}}}:keys"


def user_streams_key(uid: str) -> str:
    """Sorted set of a user's open streams (connection id -> lease expiry), for the cap."""
    return f"user:{{{uid}}}:streams"


def api_key_key(key_id: str) -> str:
    """Hash of one API key: user, SHA-256 of the secret, created_at, revoked_at, cookie_gen."""
    return f"apikey:{{{key_id}}}"


# Field of an API key's hash: its cookie generation, raised by each sign-out (absent: 0). A session
# cookie signs the generation it was minted in and is valid only while that is still the key's.
COOKIE_GEN = "cookie_gen"


def cookie_generation(stored: str | bytes | None) -> int:
    """A key's cookie generation from its stored COOKIE_GEN field (absent or unreadable: 0)."""
    return int(stored) if stored and stored.isascii() and stored.isdigit() else 0


def entry_id(event_id: int) -> str:
    """Stream entry id of event `event_id`; also the exclusive XREAD start for 'after event_id'."""
    return f"{event_id + 1}-0"


def event_id_of(entry: bytes | str) -> int:
    """Event id of a stream entry id."""
    if isinstance(entry, str):
        entry = entry.encode()
    return int(entry.split(b"-", 1)[0]) - 1


# The agent runtime -------------------------------------------------------------------------

def conv_inbox_key(cid: str) -> str:
    """List of the ids of a conversation's user messages that no run has ended yet, oldest first."""
    return f"conv:{{{cid}}}:inbox"


def conv_run_key(cid: str) -> str:
    """Hash of the run in progress: its cause, the last step written, and each step's event id."""
    return f"conv:{{{cid}}}:run"


def conv_reply_key(cid: str) -> str:
    """The text so far of the reply being produced (live deltas), for streams that join mid-reply."""
    return f"conv:{{{cid}}}:reply"


# The consumer group every agent worker reads the work shards with.
AGENT_GROUP = "agents"


def agent_work_key(shard: int) -> str:
    """Stream of one work shard: an entry (field `c`: conversation id) says a conversation has work."""
    return f"agent:work:{{{shard}}}"


def agent_shard(cid: str, shards: int) -> int:
    """The work shard of a conversation (CRC-32 of its id: any language computes the same)."""
    return zlib.crc32(cid.encode()) % shards
