"""Property tests (hypothesis): the SSE wire format, action validation and id parsing hold for any input.

The SSE frames are read back by a parser written from the WHATWG HTML standard's "event stream
interpretation" (section 9.2.6), not by the project's own reader: what a browser's EventSource
would dispatch is what is checked. A few generated contents also go over a real gunicorn stream.
"""
from __future__ import annotations

import codecs
import json
import re
import socket
import time
import urllib.parse

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from app import sse, stream, validation
from app.errors import BadRequest
from app.keys import conv_channel
from app.replies import delta_frame

from .conftest import Api, assert_error, bearer, create
from .servers import wait_until

# Every test here uses the app's test client or pure functions; examples are bounded so the
# module runs in a few seconds (the real-gunicorn round trip has its own, smaller, budget).
FAST = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(max_examples=8, deadline=None, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])


# A parser of the standard ----------------------------------------------------------------------


class EventStreamParser:
    """The WHATWG "event stream interpretation" algorithm, fed bytes in pieces of any size."""

    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")  # "UTF-8 decode" replaces errors
        self.pending = ""
        self.started = False
        self.data = ""
        self.event_type = ""
        self.last_event_id = ""
        self.retry: int | None = None
        self.dispatched: list[tuple[str, str, str]] = []  # (type, data, lastEventId)

    def feed(self, chunk: bytes) -> None:
        """Interpret more of the stream: every complete line in it."""
        text = self.decoder.decode(chunk)
        if not self.started and text:
            self.started = True
            text = text.removeprefix("\ufeff")  # one leading BOM is skipped
        self.pending += text
        while match := re.search(r"\r\n|\r|\n", self.pending):
            if match.group() == "\r" and match.end() == len(self.pending):
                break  # a CR at the end may be the first half of a CRLF
            line, self.pending = self.pending[:match.start()], self.pending[match.end():]
            self._line(line)

    def _line(self, line: str) -> None:
        if line == "":
            self._dispatch()
        elif line.startswith(":"):
            pass  # a comment
        else:
            name, colon, value = line.partition(":")
            if colon and value.startswith(" "):
                value = value[1:]
            self._field(name, value)

    def _field(self, name: str, value: str) -> None:
        if name == "event":
            self.event_type = value
        elif name == "data":
            self.data += value + "\n"
        elif name == "id":
            if "\x00" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value and all("0" <= c <= "9" for c in value):
                self.retry = int(value)

    def _dispatch(self) -> None:
        if self.data == "":
            self.event_type = ""
            return
        data = self.data[:-1] if self.data.endswith("\n") else self.data
        self.dispatched.append((self.event_type or "message", data, self.last_event_id))
        self.data = self.event_type = ""


def interpret(wire: bytes, cuts: list[int] | None = None) -> EventStreamParser:
    """The parser after the whole of `wire`, fed in pieces cut at `cuts` (byte offsets, any order)."""
    parser = EventStreamParser()
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts or [])})
    for start, end in zip(points, points[1:]):
        parser.feed(wire[start:end])
    return parser


def test_the_parser_follows_the_standard_on_its_own_examples():
    # The standard's examples (9.2.6): line ends of all three kinds, a field without a colon,
    # "data:" without a space, an event with no data, a NUL in an id.
    wire = b"data: YHOO\ndata: +2\r\ndata: 10\r: c\nid: 1\ndata\n\nevent: x\n\nid: a\x00b\ndata:z\n\n"
    parser = interpret(wire)
    assert parser.dispatched == [("message", "YHOO\n+2\n10\n", "1"), ("message", "z", "1")]


# Strategies ------------------------------------------------------------------------------------

# Text of every plane; the characters a line-based format could trip on are drawn often.
TRICKY = st.sampled_from(["\n", "\r", "\r\n", "\u2028", "\u2029", "\x00", "\x85", "\ufeff", "\x1c", "\ud7ff",
                          "\U0010ffff", "\U0001f600", ":", "data: x\n\n", "\\", '"', "é"])
TEXT = st.lists(st.one_of(st.text(st.characters(codec="utf-8"), max_size=12), TRICKY), max_size=6).map("".join)
INT64 = st.integers(-(2**63), 2**63 - 1)
JSON = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
KIND = st.from_regex(r"[a-z0-9_]{1,64}", fullmatch=True).filter(lambda k: k not in ("user_message", "message"))
EXTRA = st.dictionaries(TEXT.filter(lambda k: k not in ("id", "timestamp", "source", "type", "action")), JSON,
                        max_size=5)


@st.composite
def valid_actions(draw: st.DrawFn) -> dict:
    """An action API.md takes: a kind in `type` or `action`, message content where needed, anything else."""
    form = draw(st.sampled_from(["type", "user_message", "action", "message"]))
    extra = draw(EXTRA)
    if form == "type":
        body = {"type": draw(KIND), **extra}
    elif form == "user_message":
        body = {"type": "user_message", **extra, "content": draw(TEXT.filter(bool))}
    elif form == "action":
        body = {"action": draw(KIND), **extra}
    else:
        body = {"action": "message", **extra, "args": {**draw(EXTRA), "content": draw(TEXT.filter(bool))}}
    if draw(st.booleans()):
        body["source"] = "user"  # allowed, and replaced by the server's
    return body


# The SSE encoder -------------------------------------------------------------------------------


@FAST
@given(event_id=st.integers(0, 2**63 - 1), fields=valid_actions(), cuts=st.lists(st.integers(0, 10**6)))
def test_a_stored_event_reaches_a_standard_parser_unchanged(event_id, fields, cuts):
    stored = b'{"id":%d,' % event_id + orjson.dumps({"timestamp": "t", "source": "user", **fields})[1:]
    wire = sse.event_frame(event_id, stored)
    parser = interpret(wire, cuts)
    assert parser.dispatched == [("message", stored.decode(), str(event_id))]
    assert json.loads(parser.dispatched[0][1]) == json.loads(stored)


@FAST
@given(name=st.sampled_from(["connection", "agent_message_delta", "history_truncated"]),
       data=st.dictionaries(TEXT, JSON, max_size=6), cuts=st.lists(st.integers(0, 10**6), max_size=5))
def test_a_named_event_reaches_a_standard_parser_unchanged(name, data, cuts):
    parser = interpret(sse.named_event(name, data), cuts)
    ((kind, text, _last_id),) = parser.dispatched
    assert kind == name and json.loads(text) == data


@FAST
@given(value=st.integers(), text=TEXT)
def test_integers_beyond_64_bits_and_any_text_are_exact_in_a_named_event(value, text):
    parser = interpret(sse.named_event("connection", {"latest_event_id": value, "note": text}))
    assert json.loads(parser.dispatched[0][1]) == {"latest_event_id": value, "note": text}


def test_a_named_event_with_data_json_cannot_carry_is_refused_not_sent_broken():
    # A lone surrogate has no UTF-8 form; NaN is not JSON. Neither is ever written half-encoded.
    for data in ({"t": "\ud800", "n": 2**70}, {"f": float("nan"), "n": 2**70}):
        with pytest.raises(ValueError):
            sse.named_event("connection", data)


@FAST
@given(
    retry=st.integers(0, 10**9), latest=st.integers(-1, 2**80), agent_state=st.none() | TEXT,
    pages=st.lists(st.tuples(st.integers(0, 3), st.lists(valid_actions(), max_size=3)), max_size=4),
    delta=st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1), TEXT),
    cuts=st.lists(st.integers(0, 10**6), max_size=8),
)
def test_a_whole_stream_in_http_chunks_reaches_a_standard_parser_in_order(retry, latest, agent_state, pages, delta,
                                                                         cuts):
    connection = {"type": "connection_established", "connection_id": "c", "conversation_id": "x",
                  "latest_event_id": latest, "providers_set": ["github"], "agent_state": agent_state}
    body = [sse.opening(retry, connection)]
    expected = [("connection", connection, "")]
    last, after = "", -1
    for gap, actions in pages:  # pages of stored events, each after a gap (trimmed history) or not
        page = [(after + gap + 1 + i, orjson.dumps({"id": after + gap + 1 + i, **a})) for i, a in enumerate(actions)]
        if not page:
            continue
        body.append(stream.page_frames(after, page))
        if gap:
            expected.append(("history_truncated", {"earliest_event_id": page[0][0]}, last))
        for n, data in page:
            last = str(n)
            expected.append(("message", json.loads(data), last))
        after = page[-1][0]
        body.append(sse.PING)
    body.append(delta_frame(*delta))  # a delta has no id: lastEventId stays what it was
    expected.append(("agent_message_delta", {"cause": delta[0], "offset": delta[1], "text": delta[2]}, last))
    wire = b"".join(sse.http_chunk(part) for part in body) + b"0\r\n\r\n"
    parser = interpret(dechunk(wire), cuts)
    assert parser.retry == retry
    assert [(kind, json.loads(data), last_id) for kind, data, last_id in parser.dispatched] == expected


def dechunk(wire: bytes) -> bytes:
    """The body of an HTTP/1.1 chunked message (strict: every size and CRLF must be right)."""
    out, rest = b"", wire
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            return out
        out, rest = out + rest[:size], rest[size:]
        assert rest.startswith(b"\r\n")
        rest = rest[2:]


# Action validation, through the app ------------------------------------------------------------


def stored_events(client, key: str, cid: str) -> list[dict]:
    """The conversation's events from the REST listing."""
    response = client.get(f"/api/conversations/{cid}/events", headers=bearer(key))
    assert response.status_code == 200
    return response.get_json()["events"]


@FAST
@given(action=valid_actions())
def test_a_valid_action_is_stored_exactly_as_posted(client, key, action):
    cid = create(client, key)
    response = client.post(f"/api/conversations/{cid}/events", headers=bearer(key), data=orjson.dumps(action),
                           content_type="application/json")
    assert response.status_code == 200, response.data
    assert response.get_json() == {"status": "ok", "success": True, "event_id": 0}
    (event,) = stored_events(client, key, cid)
    posted = {k: v for k, v in action.items() if k != "source"}
    assert list(event)[:3] == ["id", "timestamp", "source"]
    assert (event["id"], event["source"]) == (0, "user")
    assert {k: v for k, v in event.items() if k not in ("id", "timestamp", "source")} == posted
    assert list(event)[3:] == list(posted)  # in the posted order


NOT_A_KIND = st.one_of(
    st.text(max_size=70).filter(lambda k: not re.fullmatch(r"[a-z0-9_]{1,64}", k)),
    st.none(), st.booleans(), st.integers(), st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)


@st.composite
def invalid_bodies(draw: st.DrawFn) -> bytes:
    """A body API.md refuses: a bad kind, no kind, missing content, a server field, not an object, not JSON."""
    good = draw(valid_actions())
    way = draw(st.sampled_from(["kind", "no kind", "content", "args", "server field", "source", "not an object",
                                "not json", "surrogate", "huge int"]))
    if way == "kind":
        body = {**good, "type" if "type" in good else "action": draw(NOT_A_KIND)}
    elif way == "no kind":
        body = {k: v for k, v in good.items() if k not in ("type", "action")}
    elif way == "content":
        body = {**good, "type": "user_message", "content": draw(st.sampled_from([None, "", 1, [], {}, ["x"]]))}
    elif way == "args":
        args = draw(st.sampled_from([None, "x", [], {}, {"content": ""}, {"content": 1}]))
        body = {"action": "message", "args": args}
    elif way == "server field":
        body = {**good, draw(st.sampled_from(["id", "timestamp"])): draw(JSON)}
    elif way == "source":
        body = {**good, "source": draw(JSON.filter(lambda v: v != "user"))}
    elif way == "not an object":
        return orjson.dumps(draw(JSON.filter(lambda v: not isinstance(v, dict))))
    elif way == "not json":
        raw = draw(st.binary(max_size=40))
        try:
            json.loads(raw)
            assume(False)
        except ValueError:
            pass
        return raw
    elif way == "surrogate":  # valid JSON text, but no UTF-8 string: I-JSON (RFC 7493) refuses it
        return json.dumps({**good, "note": draw(st.sampled_from(["\ud800", "a\udfffb", "\udbff"]))}).encode()
    else:
        huge = draw(st.integers(2**64, 10**30) | st.integers(-(10**30), -(2**63) - 1))  # past what orjson holds
        return json.dumps({**good, "n": huge}).encode()
    return json.dumps(body).encode()


@FAST
@given(body=invalid_bodies())
def test_an_invalid_action_is_a_json_400_and_stores_nothing(client, key, body):
    cid = create(client, key)
    response = client.post(f"/api/conversations/{cid}/events", headers=bearer(key), data=body,
                           content_type="application/json")
    assert_error(response, 400)
    assert response.get_json()["error"] in ("bad_request", "invalid_json")
    assert stored_events(client, key, cid) == []


def test_the_invalid_action_strategy_really_breaks_each_rule():
    # Each refused body is refused by validation itself (not by chance elsewhere).
    @settings(max_examples=100, deadline=None, database=None)
    @given(body=invalid_bodies())
    def check(body):
        with pytest.raises(BadRequest):
            validation.action(validation.decode_json_object(body))

    check()


# Id parsing ------------------------------------------------------------------------------------

ID_LIKE = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"[ \t]*[+-]?[0-9]{1,25}[ \t]*", fullmatch=True),
    st.sampled_from(["-0", "+0", "-1", "-2", "1e3", "0x10", "1_000", "٣", "١٢", "²", "①", "0b1", " ", "+", "-",
                     "++1", "1.0", "\u30007", "7\u2028", "\x1c5", "\n5", "5\x00", "9" * 30, "-" + "9" * 30]),
)


def contract_int(raw: str | None) -> int | None:
    """What API.md's "an integer" means: ASCII digits with an optional sign, HTTP whitespace around; None if not."""
    if raw is None or raw.strip(" \t") == "":
        return None
    match = re.fullmatch(r"[ \t]*([+-]?[0-9]+)[ \t]*", raw)
    if not match:
        raise ValueError(raw)
    return int(match.group(1))


@FAST
@given(header=st.none() | ID_LIKE, query=st.none() | ID_LIKE)
@example(header=None, query="\u30007")
@example(header="\x1c5", query=None)
def test_resume_point_is_the_contract_integer_or_a_400(header, query):
    chosen = header if header is not None and header.strip(" \t") != "" else query
    try:
        expected = contract_int(chosen)
    except ValueError:
        expected = "400"
    if expected is None:
        expected = -1
    elif expected != "400" and expected < -1:
        expected = "400"
    try:
        got = validation.resume_point(header, query)
    except BadRequest as err:
        assert err.status == 400
        got = "400"
    assert got == expected


@FAST
@given(raw=ID_LIKE)
def test_start_id_and_limit_have_the_contract_meaning_or_are_a_400(client, key, raw):
    cid = create(client, key, initial_user_msg="hello")  # event 0
    for _ in range(2):  # events 1 and 2
        client.post(f"/api/conversations/{cid}/events", headers=bearer(key), json={"type": "note"})
    try:
        value = contract_int(raw)
    except ValueError:
        value = "bad"
    quoted = urllib.parse.quote(raw, safe="")
    start = client.get(f"/api/conversations/{cid}/events?start_id={quoted}", headers=bearer(key))
    if value == "bad" or (value is not None and value < 0):
        assert_error(start, 400, "bad_request")
    else:
        assert start.status_code == 200
        assert [e["id"] for e in start.get_json()["events"]] == [n for n in range(3) if n >= (value or 0)]
    limit = client.get(f"/api/conversations/{cid}/events?limit={quoted}", headers=bearer(key))
    if value == "bad" or (value is not None and value < 1):
        assert_error(limit, 400, "bad_request")
    else:
        assert limit.status_code == 200
        assert len(limit.get_json()["events"]) == min(3, value or 100)


@FAST
@given(raw=ID_LIKE | st.text(max_size=30))
def test_page_id_is_one_this_server_gave_out_or_a_400(client, key, raw):
    create(client, key)
    response = client.get(f"/api/conversations?page_id={urllib.parse.quote(raw, safe='')}", headers=bearer(key))
    if raw == "" or (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        assert response.status_code == 200
    else:
        assert_error(response, 400, "bad_request")


@FAST
@given(header=st.none() | ID_LIKE.filter(lambda v: v.isprintable() or not v), query=st.none() | ID_LIKE)
def test_a_stream_id_is_accepted_or_a_400_never_a_500(client, key, header, query):
    assume(header is None or header.encode("latin-1", "ignore").decode("latin-1") == header)
    cid = create(client, key)
    headers = bearer(key) | ({"Last-Event-ID": header} if header is not None else {})
    path = f"/api/sse/conversations/{cid}/events"
    if query is not None:
        path += f"?latest_event_id={urllib.parse.quote(query, safe='')}"
    response = client.head(path, headers=headers)  # HEAD: the checks of a GET, no stream behind them
    try:
        validation.resume_point(header, query)
        assert response.status_code == 200
    except BadRequest:
        assert response.status_code == 400 and response.mimetype == "application/json"


# A real gunicorn stream ------------------------------------------------------------------------


class RawStream:
    """An event stream over a raw socket: head checked, body dechunked strictly, fed to the standard's parser."""

    def __init__(self, port: int, path: str, key: str, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                          "Accept: text/event-stream\r\n\r\n".encode())
        self.raw, self.head, self.parser, self.timeout = b"", None, EventStreamParser(), timeout

    def until(self, count: int) -> list[tuple[str, str, str]]:
        """The events dispatched so far, once there are `count` of them."""
        deadline = time.monotonic() + self.timeout
        while len(self.parser.dispatched) < count:
            assert time.monotonic() < deadline, self.parser.dispatched
            data = self.sock.recv(65536)
            assert data, "the stream ended early"
            self.raw += data
            if self.head is None and b"\r\n\r\n" in self.raw:
                self.head, self.raw = self.raw.split(b"\r\n\r\n", 1)
                assert self.head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in self.head.lower()
            while self.head is not None and b"\r\n" in self.raw:
                size_line, rest = self.raw.split(b"\r\n", 1)
                size = int(size_line, 16)
                if len(rest) < size + 2:
                    break
                assert rest[size:size + 2] == b"\r\n"
                self.parser.feed(rest[:size])
                self.raw = rest[size + 2:]
        return self.parser.dispatched

    def close(self) -> None:
        """Drop the connection."""
        self.sock.close()


RETENTION = 2


@pytest.mark.timeout(60)
def test_generated_events_survive_a_real_gunicorn_stream(start_server, make_key, app):
    # Stored events (id + data), the connection event, history_truncated (a retention of 2 trims
    # older events) and a live agent_message_delta, all read by the standard's parser.
    server = start_server(EVENT_RETENTION=str(RETENTION))
    api = Api(server.base, make_key("alice"))

    @FEW
    @given(actions=st.lists(valid_actions(), min_size=1, max_size=4), text=TEXT)
    def check(actions: list[dict], text: str) -> None:
        cid = api.create()
        for action in actions:
            status, answer, _ = api.call("POST", f"/api/conversations/{cid}/events", action)
            assert status == 200, answer
        kept = list(range(len(actions)))[-RETENTION:]
        stream = RawStream(server.port, f"/api/sse/conversations/{cid}/events?latest_event_id=-1", api.key)
        try:
            truncated = kept[0] > 0
            connection, *events = stream.until(1 + truncated + len(kept))
            assert connection[0] == "connection" and json.loads(connection[1])["conversation_id"] == cid
            if truncated:
                assert events.pop(0) == ("history_truncated", f'{{"earliest_event_id":{kept[0]}}}', "")
            assert [(kind, last_id) for kind, _, last_id in events] == [("message", str(n)) for n in kept]
            for (_kind, data, _id), n in zip(events, kept):
                event = json.loads(data)
                assert {k: v for k, v in event.items() if k not in ("id", "timestamp", "source")} == \
                    {k: v for k, v in actions[n].items() if k != "source"}
            # A live delta, as the agent runtime publishes it: after the last event, with no id.
            delta = {"cause": kept[-1], "offset": 0, "text": text}
            store = app.extensions["store"]  # PUBLISH, or SPUBLISH on a Redis 7 Cluster, as the runtime does
            payload = b"~%d:" % kept[-1] + orjson.dumps(delta)
            wait_until(lambda: store.redis.execute_command(store.publish, conv_channel(cid), payload),
                       5, what="the hub listening on the conversation's channel")
            assert stream.until(2 + truncated + len(kept))[-1] == \
                ("agent_message_delta", orjson.dumps(delta).decode(), str(kept[-1]))
        finally:
            stream.close()

    check()
