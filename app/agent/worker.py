"""An agent worker: reads the work shards, answers each conversation's queued messages in order.

One loop per shard reads new work entries (XREADGROUP) while a run slot is free; a claim loop
takes over entries a dead worker left (XAUTOCLAIM after AGENT_CLAIM_IDLE_SECONDS); a heartbeat
renews the lease of every run going, resets its entry's idle time, and cancels a run whose user
asked it to stop (or whose lease another worker took). A work entry is acknowledged only once
everything queued in its conversation was answered, so a worker killed at any moment leaves
its entry to be claimed. Runs of different conversations go in parallel (AGENT_CONCURRENCY).
TERM ends the worker warmly (runs going may finish for SHUTDOWN_GRACE seconds, the rest are
handed over at once); a second TERM or INT hands everything over at once.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Mapping
from typing import Any

import gevent
import gevent.event
import gevent.lock
import redis

from ..errors import ServiceUnavailable, redis_unavailable
from ..redis import make_client
from .base import Agent
from .run import Run
from .runs import RunStore

log = logging.getLogger(__name__)

BLOCK_MS = 1000
SHUTDOWN_GRACE = 10.0
BATCH = 64  # most work entries read at once per shard
HELD_PER_SLOT = 4


class Worker:
    """One agent worker process's loops over the work shards."""

    def __init__(self, config: Mapping[str, Any], store: Any, agent: Agent, concurrency: int):
        claim_idle = config["AGENT_CLAIM_IDLE_SECONDS"]
        self.config = config
        self.agent = agent
        self.concurrency = concurrency
        self.claim_idle_ms = int(claim_idle * 1000)
        # Entries are touched and leases renewed on the same tick; the lease is the shorter, so the
        # moment a dead worker's entry may be claimed its lease has run out.
        history = min(agent.history_events or config["AGENT_HISTORY_EVENTS"], config["AGENT_HISTORY_EVENTS"])
        self.runs = RunStore(store, lease_ms=int(self.claim_idle_ms * 0.8), history=history)
        self.heartbeat = min(0.25, claim_idle / 5)
        self.step_timeout = config["AGENT_STEP_TIMEOUT_SECONDS"]
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.slots = gevent.lock.BoundedSemaphore(concurrency)
        # Blocking reads hold a connection each: a client of their own, one connection per shard.
        self.reader = make_client(config["REDIS_URL"], self.runs.shards + 2, BLOCK_MS / 1000 + 5)
        self.active: dict[str, Run] = {}  # conversation id -> its run going here
        self.entries: dict[int, dict[bytes, str]] = {s: {} for s in range(self.runs.shards)}  # held, touched
        self.handover: dict[int, dict[bytes, str]] = {s: {} for s in range(self.runs.shards)}  # let go: re-queue
        self.claim_cursor = [b"0-0"] * self.runs.shards
        self.stopping = gevent.event.Event()
        self.cold = False  # hand the runs going over at once (a second TERM, or INT)
        self.handlers: set[gevent.Greenlet] = set()
        self.handled = 0

    # Loops ---------------------------------------------------------------------------------

    def serve(self) -> None:
        """Run until `stop()`; then hand over what is left."""
        self._wait_for_redis()
        log.info("agent worker %s: agent %s, %d at once, %d shards", self.consumer, self.agent.name or
                 type(self.agent).__name__, self.concurrency, self.runs.shards)
        loops = [gevent.spawn(self._forever, f"read {s}", self._read_loop, s) for s in range(self.runs.shards)]
        loops += [gevent.spawn(self._forever, "claim", self._claim_loop),
                  gevent.spawn(self._forever, "heartbeat", self._heartbeat_loop)]
        self.stopping.wait()
        # The read loops end by themselves within a read's block time: killed in the middle of an
        # XREADGROUP, what Redis delivered would be pending here and known to no handler.
        gevent.joinall(loops[:-1], timeout=BLOCK_MS / 1000 + 2)
        gevent.joinall(list(self.handlers), timeout=SHUTDOWN_GRACE if not self.cold else 0)
        self._hand_over()
        loops[-1].kill()
        log.info("agent worker %s stopped after %d work entries", self.consumer, self.handled)

    def stop(self, cold: bool = False) -> None:
        """Stop taking work; runs going may finish (warm) or are handed over at once (cold)."""
        if self.stopping.is_set():
            cold = True
        self.cold = self.cold or cold
        self.stopping.set()
        if self.cold:
            for run in list(self.active.values()):
                run.cancel("shutdown")

    def _wait_for_redis(self) -> None:
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                self.runs.ensure_groups()
                return
            except redis.RedisError as err:
                log.warning("agent worker: Redis not ready (%s); again in %.1fs", type(err).__name__, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _forever(self, name: str, loop: Any, *args: Any) -> None:
        backoff = 0.05
        while not self.stopping.is_set():
            try:
                loop(*args)
                return
            except redis.RedisError as err:
                if redis_unavailable(err) is None and not isinstance(err, redis.ResponseError):
                    log.exception("agent %s loop failed", name)
                else:
                    log.warning("agent %s loop: %s; again in %.2fs", name, type(err).__name__, backoff)
                if "NOGROUP" in str(err):  # the shard was deleted (FLUSHALL): make it again
                    self._wait_for_redis()
            except Exception:  # noqa: BLE001 - a dead loop would leave work unanswered
                log.exception("agent %s loop failed", name)
            self.stopping.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _free_slots(self, wait: bool) -> int:
        """How many more entries to take now: free run slots, within what this worker may hold at once.

        Entries of a conversation already running here wait without a slot (and are touched every
        tick): HELD_PER_SLOT x AGENT_CONCURRENCY bounds them.
        """
        if wait and not self.slots.counter:
            self.slots.wait(timeout=BLOCK_MS / 1000)
        room = self.concurrency * HELD_PER_SLOT - sum(len(held) for held in self.entries.values())
        if wait and room <= 0:
            self.stopping.wait(self.heartbeat)
        return max(0, min(self.slots.counter, BATCH, room))

    def _read_loop(self, shard: int) -> None:
        # Reads no more than the free slots; several shards may read for the same slots, so an
        # entry read may wait in its handler for a slot (held, and touched, meanwhile).
        while not self.stopping.is_set():
            free = self._free_slots(wait=True)
            if not free:
                continue
            for entry, cid in self.runs.read_work(self.reader, shard, self.consumer, free, BLOCK_MS):
                self._spawn(shard, entry, cid)

    def _claim_loop(self) -> None:
        first = 0
        while not self.stopping.wait(max(self.claim_idle_ms / 2000, 0.1)):
            first = (first + 1) % self.runs.shards  # no shard always served first, or last
            for shard in [*range(first, self.runs.shards), *range(first)]:
                free = self._free_slots(wait=False)
                if not free:
                    break
                cursor, work = self.runs.claim_idle(shard, self.consumer, self.claim_idle_ms, free,
                                                    self.claim_cursor[shard])
                self.claim_cursor[shard] = cursor
                for entry, cid in work:
                    log.info("agent: took over conversation %s (entry %s of shard %d)", cid, entry.decode(), shard)
                    self._spawn(shard, entry, cid)

    def _heartbeat_loop(self) -> None:
        while True:
            gevent.sleep(self.heartbeat)
            runs = [run for run in self.active.values() if run.token]
            if runs:
                try:
                    answers = self.runs.renew([(run.cid, run.token) for run in runs])
                except redis.RedisError as err:
                    log.warning("agent heartbeat: %s (leases not renewed this time)", type(err).__name__)
                    answers = []
                for run, (held, stop) in zip(runs, answers):
                    if held == -1:
                        run.cancel("gone")
                    elif held == 0:
                        run.cancel("lost")
                    elif stop:
                        run.cancel("stop")
            # On the same tick as the renewals (see the lease's length).
            for shard, held_entries in self.entries.items():
                if held_entries:
                    try:
                        self.runs.touch(shard, self.consumer, list(held_entries))
                    except redis.RedisError as err:
                        log.warning("agent heartbeat: touching entries failed (%s)", type(err).__name__)

    # Work entries --------------------------------------------------------------------------

    def _spawn(self, shard: int, entry: bytes, cid: str) -> None:
        self.entries[shard][entry] = cid
        handler = gevent.spawn(self._handle, shard, entry, cid)
        self.handlers.add(handler)
        handler.link(lambda g: self.handlers.discard(g))

    def _handle(self, shard: int, entry: bytes, cid: str) -> None:
        """Answer what the conversation has queued; acknowledge the entry once nothing is left."""
        outcome = "keep"
        try:
            while outcome == "keep":
                local = self.active.get(cid)
                if local is not None:
                    # Its run here may end without seeing this entry's message (posted just as the
                    # run let go): look again once it ended, through the lease like anyone else.
                    local.ended.wait()
                    continue
                with self.slots:
                    # Checked again with the slot: another entry of the conversation may have taken
                    # one first. No switch between this check and the run's registration.
                    if cid in self.active:
                        continue
                    outcome = self._answer(cid)
                break
        except (redis.RedisError, ServiceUnavailable) as err:
            # Whether it ran or not (or is not replicated yet), the entry stays: claimed again once
            # idle, the steps written kept.
            log.warning("agent: conversation %s left for later (%s)", cid, type(err).__name__)
        except Exception:  # noqa: BLE001 - one conversation's failure must not stop the others
            log.exception("agent: conversation %s failed; left for another try", cid)
        finally:
            self.handled += 1
            self.entries[shard].pop(entry, None)
            if outcome == "done":
                try:
                    self.runs.done(shard, [entry])
                except redis.RedisError as err:
                    log.warning("agent: could not acknowledge entry %s (%s); it will be looked at again",
                                entry.decode(), type(err).__name__)
            elif outcome == "handover":
                self.handover[shard][entry] = cid
            # "keep": left pending and no longer touched, so it is claimed (and looked at) once idle

    def _answer(self, cid: str) -> str:
        """Answer the conversation's queue while this worker holds its lease: done, keep or handover."""
        if self.stopping.is_set():
            return "handover"
        run = Run(self, cid)
        self.active[cid] = run
        try:
            return run.answer_queue()
        finally:
            if self.active.get(cid) is run:
                del self.active[cid]
                self.runs.announced.pop(cid, None)
            run.ended.set()

    def _hand_over(self) -> None:
        """Shutting down: runs still going are cancelled, their leases let go and their work re-queued."""
        for run in list(self.active.values()):
            run.cancel("shutdown")
        gevent.joinall(list(self.handlers), timeout=5)
        # Only entries whose lease was let go (or never taken): a handler still stuck on Redis keeps
        # its entry pending, to be claimed once idle, while its lease runs out.
        for shard, entries in self.handover.items():
            while entries:  # popped one by one: a handler ending meanwhile adds its own
                entry, cid = entries.popitem()
                try:
                    self.runs.requeue(cid)  # a new entry first: at no moment is the work in no entry
                    self.runs.done(shard, [entry])
                except redis.RedisError as err:
                    log.warning("agent: could not hand conversation %s over (%s); it is claimed once idle",
                                cid, type(err).__name__)
