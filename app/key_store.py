"""API keys (only their hashes are stored) and the leases that cap a user's open streams across workers.

The base of store.Store: the records auth, the CLI and the hub read, on the store's Redis client.
"""
from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

import redis

from .cluster import forget_slots, pipelines_per_node
from .keys import api_key_key, user_keys_key, user_streams_key
from .lua import ACQUIRE_STREAM_LUA, RENEW_STREAMS_LUA
from .redis import Client

KEY_PREFIX = "ohk_"


def now_iso() -> str:
    """The current UTC time as ISO 8601 with microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def hash_secret(secret: str) -> str:
    """SHA-256 of an API key (keys are random and long, so a fast hash is the right one)."""
    return hashlib.sha256(secret.encode()).hexdigest()


class KeysAndLeases:
    """API keys and stream leases, on one Redis client."""

    def __init__(self, client: Client):
        self.redis = client
        self._acquire_stream = client.register_script(ACQUIRE_STREAM_LUA)
        self._renew_streams = client.register_script(RENEW_STREAMS_LUA)

    # API keys -----------------------------------------------------------------------------

    def create_api_key(self, user_id: str) -> tuple[str, str]:
        """Create a key for `user_id`; return (key id, the key). Only its hash is stored."""
        key_id = secrets.token_hex(8)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(api_key_key(key_id), mapping={"user_id": user_id, "hash": hash_secret(key), "created_at": now_iso()})
        pipe.sadd(user_keys_key(user_id), key_id)
        pipe.execute()
        return key_id, key

    def get_api_key(self, key_id: str) -> dict[str, str]:
        """A key's record (user_id, hash, created_at, revoked_at?), empty when unknown."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(api_key_key(key_id)).items()}

    def revoke_api_key(self, key_id: str) -> bool:
        """Mark a key revoked; False when there is no such key."""
        if not self.redis.exists(api_key_key(key_id)):
            return False
        self.redis.hsetnx(api_key_key(key_id), "revoked_at", now_iso())
        return True

    def list_api_keys(self, user_id: str) -> list[dict[str, str]]:
        """A user's keys (never the secret), oldest first."""
        ids = sorted(k.decode() for k in self.redis.smembers(user_keys_key(user_id)))
        pipe = self.redis.pipeline(transaction=False)
        for key_id in ids:
            pipe.hgetall(api_key_key(key_id))
        rows = []
        for key_id, rec in zip(ids, pipe.execute()):
            if rec:
                rows.append({"key_id": key_id, **{k.decode(): v.decode() for k, v in rec.items() if k != b"hash"}})
        return sorted(rows, key=lambda row: row["created_at"])

    # Stream leases (per-user cap across workers) ------------------------------------------

    def acquire_stream(self, user_id: str, connection_id: str, cap: int, ttl: float) -> bool:
        """Take one of the user's `cap` stream slots for `ttl` seconds; False when all are taken."""
        return bool(self._acquire_stream(keys=[user_streams_key(user_id)], args=[ttl, cap, connection_id]))

    def renew_streams(self, leases: dict[str, list[str]], ttl: float, client: redis.Redis | None = None) -> None:
        """Renew the leases of these users' open streams (user id -> connection ids) for `ttl` seconds."""
        users = list(leases)
        keys = [user_streams_key(user_id) for user_id in users]
        for node_client, positions in pipelines_per_node(client or self.redis, keys).items():
            pipe = node_client.pipeline(transaction=False)
            for i in positions:
                self._renew_streams(keys=[keys[i]], args=[ttl, *leases[users[i]]], client=pipe)
            try:
                pipe.execute()
            except (redis.exceptions.MovedError, redis.exceptions.AskError):
                forget_slots(client or self.redis)  # renewed on the right node next time
                raise

    def release_stream(self, user_id: str, connection_id: str) -> None:
        """Give a stream slot back."""
        self.redis.zrem(user_streams_key(user_id), connection_id)
