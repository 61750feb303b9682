"""The SSE wire format, byte for byte, and the event id <-> stream entry id mapping (pure functions)."""
from __future__ import annotations

import json

import pytest

from app import sse
from app.store import entry_id, event_id_of


@pytest.mark.parametrize(("ms", "frame"), [(3000, b"retry: 3000\n\n"), (0, b"retry: 0\n\n"), (15, b"retry: 15\n\n")])
def test_retry_frame(ms, frame):
    assert sse.retry_frame(ms) == frame


def test_ping_is_a_comment_line():
    assert sse.PING == b": ping\n\n"


def test_named_event_is_compact_json_on_one_data_line():
    data = {"type": "connection_established", "connection_id": "c1", "conversation_id": "x",
            "latest_event_id": -1, "providers_set": ["github", "gitlab"]}
    assert sse.named_event("connection", data) == (
        b'event: connection\ndata: {"type":"connection_established","connection_id":"c1",'
        b'"conversation_id":"x","latest_event_id":-1,"providers_set":["github","gitlab"]}\n\n'
    )


def test_named_event_escapes_newlines_inside_the_data():
    frame = sse.named_event("note", {"text": "line 1\nline 2\r\n"})
    assert frame == b'event: note\ndata: {"text":"line 1\\nline 2\\r\\n"}\n\n'
    assert frame.count(b"\n") == 3


def test_named_event_keeps_unicode_as_utf8():
    frame = sse.named_event("note", {"text": "é✓😀"})
    assert frame == b'event: note\ndata: {"text":"' + "é✓😀".encode() + b'"}\n\n'


def test_event_frame_has_an_id_and_the_stored_json_without_a_name():
    stored = b'{"id":3,"timestamp":"2026-11-30T12:00:00.123456+00:00","source":"user","type":"user_message",' \
             b'"content":"hello"}'
    frame = sse.event_frame(3, stored)
    assert frame == b"id: 3\ndata: " + stored + b"\n\n"
    assert b"event:" not in frame


def test_event_frame_of_event_zero():
    assert sse.event_frame(0, b"{}") == b"id: 0\ndata: {}\n\n"


def test_history_truncated():
    assert sse.history_truncated(7) == b'event: history_truncated\ndata: {"earliest_event_id":7}\n\n'


def test_frames_parse_back_as_an_event_source_would():
    """A small parser in the EventSource way: the frames carry what they mean to carry."""
    body = sse.retry_frame(2500) + sse.named_event("connection", {"a": 1}) + sse.PING \
        + sse.event_frame(4, b'{"id":4}') + sse.history_truncated(9)
    blocks = [b for b in body.decode().split("\n\n") if b]
    parsed = []
    for block in blocks:
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        parsed.append(fields)
    assert parsed == [
        {"retry": "2500"},
        {"event": "connection", "data": '{"a":1}'},
        {},
        {"id": "4", "data": '{"id":4}'},
        {"event": "history_truncated", "data": '{"earliest_event_id":9}'},
    ]
    assert json.loads(parsed[4]["data"]) == {"earliest_event_id": 9}


# Event n is stream entry "{n+1}-0": entry ids start at 1-0 (Redis refuses 0-0).


@pytest.mark.parametrize(("event_id", "entry"), [(0, "1-0"), (1, "2-0"), (41, "42-0"), (-1, "0-0"),
                                                  (10**17, "100000000000000001-0")])
def test_entry_id(event_id, entry):
    assert entry_id(event_id) == entry


@pytest.mark.parametrize(("entry", "event_id"), [(b"1-0", 0), ("1-0", 0), (b"42-0", 41), ("42-0", 41),
                                                  (b"100000000000000001-0", 10**17)])
def test_event_id_of(entry, event_id):
    assert event_id_of(entry) == event_id


@pytest.mark.parametrize("event_id", [0, 1, 2, 99, 12345, 2**40])
def test_entry_id_and_event_id_of_are_inverse(event_id):
    assert event_id_of(entry_id(event_id)) == event_id
    assert event_id_of(entry_id(event_id).encode()) == event_id


def test_entry_ids_order_like_event_ids():
    # Redis orders entries by (ms, seq) numerically; the mapping must keep event order.
    ids = [0, 1, 9, 10, 99, 100, 1000]
    entries = [tuple(int(p) for p in entry_id(n).split("-")) for n in ids]
    assert entries == sorted(entries)
