"""Live reply deltas (API.md "Live replies"): parsed once per hub, trimmed per stream, and the mid-reply snapshot.

The agent runtime publishes each delta on the conversation's channel as `~<L>:<json>`, where L is
the conversation's last event id at that moment (every event up to L was stored and announced
before it), and keeps the reply so far in `conv:{<id>}:reply` as `<cause>:<text>`. A stream sends
a delta only at its place among the events: once it has sent event L and nothing after it.

What a stream has shown of a reply is (cause, characters sent, the last event id it had then).
That record counts only while the stream has sent no event since: an event in between (the
reply's own agent_message, which replaces the deltas, or any other) starts a new window, so the
next reply of the same run (same cause, offsets from 0 again) is never mistaken for the old one.
Within a window, text the stream already has (the snapshot overlapping deltas queued meanwhile)
is cut off.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import orjson

from .sse import http_chunk, named_event

if TYPE_CHECKING:
    from .subscriber import Subscriber

log = logging.getLogger(__name__)

DELTA_EVENT = "agent_message_delta"
DELTA_MARK = b"~"  # the first byte of a delta on a conversation's channel (events start with `{`)


class Delta:
    """One published delta: where it goes among the events, its text, and its frame (made once)."""

    __slots__ = ("upto", "cause", "offset", "text", "end", "frame", "chunk")

    def __init__(self, upto: int, cause: int, offset: int, text: str):
        self.upto = upto  # the conversation's last event id when it was published
        self.cause = cause
        self.offset = offset
        self.text = text
        self.end = offset + len(text)
        self.frame = delta_frame(cause, offset, text)
        self.chunk = http_chunk(self.frame)


def delta_frame(cause: int, offset: int, text: str) -> bytes:
    """The SSE frame of a delta: named, with no `id:` line (it must not move Last-Event-ID)."""
    return named_event(DELTA_EVENT, {"cause": cause, "offset": offset, "text": text})


def _count(value: object) -> bool:
    return type(value) is int and value >= 0  # bool is an int subclass: not a count


_ID = re.compile(rb"-?[0-9]{1,19}")


def parse_delta(payload: bytes) -> Delta | None:
    """The delta in a channel message `~<L>:<json>`, or None (logged) if it is not a well-formed one."""
    head, sep, body = payload[1:].partition(b":")
    try:
        # At most 19 digits: an id fits in 64 bits, and a huge one would make int() raise.
        upto = int(head) if sep and _ID.fullmatch(head) else None
        data = orjson.loads(body) if upto is not None else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and _count(data.get("cause")) and _count(data.get("offset")) \
            and isinstance(data.get("text"), str):
        return Delta(upto, data["cause"], data["offset"], data["text"])
    log.warning("hub: ignored a malformed reply delta (%d bytes)", len(payload))
    return None


def trim(chars_sent: int, offset: int, text: str) -> tuple[int, str] | None:
    """What to send of a delta of the reply a stream shows, having sent its first `chars_sent` characters.

    None when the stream has all of it; the part past `chars_sent` when it has some; otherwise
    all of it as it is (a gap after a lost message shows in its offset, and the final
    agent_message replaces the deltas anyway).
    """
    if offset + len(text) <= chars_sent:
        return None
    if offset < chars_sent:
        return chars_sent, text[chars_sent - offset:]
    return offset, text


def frame_for(sub: Subscriber, delta: Delta) -> bytes | None:
    """The frame `sub` gets for `delta` (which must be at its place: sub.last_sent == delta.upto), None if none.

    Records what the stream has shown of the reply.
    """
    offset, text = delta.offset, delta.text
    if sub.reply_cause == delta.cause and sub.reply_at == sub.last_sent:
        cut = trim(sub.reply_chars, offset, text)
        if cut is None:
            return None
        offset, text = cut
    sub.reply_cause, sub.reply_chars, sub.reply_at = delta.cause, delta.end, sub.last_sent
    return delta.frame if offset == delta.offset else delta_frame(delta.cause, offset, text)


def runs(items: list) -> Iterator[list | Delta]:
    """A conversation's messages in order: each run of (event id, frame) items as one list, each delta alone."""
    start = 0
    for i, item in enumerate(items):
        if isinstance(item, Delta):
            if start < i:
                yield items[start:i]
            yield item
            start = i + 1
    if start < len(items):
        yield items[start:]


def hand_out(subscribers: Iterable[Subscriber], delta: Delta, limit: int) -> None:
    """Give a delta to every stream of its conversation (the hub's fan-out).

    Written at once only to a live stream at its place (it has sent event L and nothing after
    it) that has nothing queued; every other stream queues it among its batches, and its
    greenlet sends it when its turn comes (stream.live_frames), after reading what it lacks.
    """
    for sub in list(subscribers):
        if sub.last_sent > delta.upto:
            continue  # it has events after L already (last_sent only grows): its greenlet would drop it
        if sub.direct and not sub.busy and not sub.pending and sub.last_sent == delta.upto:
            frame = frame_for(sub, delta)
            if frame is not None:
                sub.write_chunk(delta.chunk if frame is delta.frame else http_chunk(frame))
        else:
            sub.deliver_delta(delta, limit)


def parse_reply(value: bytes | None) -> tuple[int, str] | None:
    """(cause, text so far) of a reply key's value `<cause>:<text>`, None if there is none (or it is malformed)."""
    if value is None:
        return None
    head, sep, text = value.partition(b":")
    if not sep or not head.isdigit():
        log.warning("stream: ignored a malformed reply in progress (%d bytes)", len(value))
        return None
    try:
        return int(head), text.decode()
    except UnicodeDecodeError:
        log.warning("stream: ignored a reply in progress that is not UTF-8")
        return None


def snapshot(sub: Subscriber, value: bytes | None) -> bytes:
    """The frame of the reply in progress for a stream that has just caught up (b"" if none): offset 0, all of it.

    Read after the stream's last catch-up read, it holds every delta published before that read:
    the stream records it as shown, so that those of them queued meanwhile are cut off.
    """
    reply = parse_reply(value)
    if reply is None:
        return b""
    cause, text = reply
    sub.reply_cause, sub.reply_chars, sub.reply_at = cause, len(text), sub.last_sent
    return delta_frame(cause, 0, text)
