"""The SSE wire format, byte for byte, and the event id <-> stream entry id mapping (pure functions)."""
from __future__ import annotations

import json

import pytest

from app import sse
from app.store import entry_id, event_id_of


@pytest.mark.parametrize("ms", [3000, 0, 15])
def test_the_opening_is_the_retry_line_and_the_connection_event_in_one_block(ms):
    frame = sse.opening(ms, {"type": "connection_established", "latest_event_id": -1})
    data = b'{"type":"connection_established","latest_event_id":-1}'
    assert frame == b"retry: %d\nevent: connection\ndata: %s\n\n" % (ms, data)
    assert frame.count(b"\n\n") == 1  # one block: no empty event before the connection event


def test_the_opening_reports_an_id_beyond_64_bits_exactly():
    frame = sse.opening(3000, {"latest_event_id": 10**30})
    assert frame == b'retry: 3000\nevent: connection\ndata: {"latest_event_id":1000000000000000000000000000000}\n\n'


def test_ping_is_a_single_comment_line_with_no_blank_line_after_it():
    assert sse.PING == b": ping\n"
    assert sse.PING_CHUNK == b"7\r\n: ping\n\r\n"


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


def dispatched(body: bytes) -> list[dict[str, str]]:
    """What a client that hands every blank-line-ended block to the application sees (httpx-sse's way)."""
    blocks = body.decode().split("\n\n")
    assert blocks[-1] == ""  # everything sent ends its block
    parsed = []
    for block in blocks[:-1]:
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        parsed.append(fields)
    return parsed


def test_frames_parse_back_with_no_empty_event():
    """Pings between events and the opening's retry line make no block of their own."""
    body = sse.opening(2500, {"a": 1}) + sse.PING + sse.PING \
        + sse.event_frame(4, b'{"id":4}') + sse.PING + sse.history_truncated(9)
    parsed = dispatched(body)
    assert parsed == [
        {"retry": "2500", "event": "connection", "data": '{"a":1}'},
        {"id": "4", "data": '{"id":4}'},
        {"event": "history_truncated", "data": '{"earliest_event_id":9}'},
    ]
    assert all(block.get("data") for block in parsed)  # every dispatched block parses as JSON
    assert json.loads(parsed[2]["data"]) == {"earliest_event_id": 9}


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
