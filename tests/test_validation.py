"""Unit tests of app/validation.py: the pure checks of client input (no Redis, no app)."""
from __future__ import annotations

import hashlib

import pytest

from app import validation
from app.errors import BadRequest


def bad_request(func, *args, **kwargs) -> BadRequest:
    """Call `func` and return the BadRequest it must raise."""
    with pytest.raises(BadRequest) as info:
        func(*args, **kwargs)
    assert info.value.status == 400
    return info.value


# parse_int ------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_parse_int_empty_is_the_default(raw):
    assert validation.parse_int("limit", raw, default=20, minimum=1, maximum=100) == 20


@pytest.mark.parametrize(("raw", "expected"), [("1", 1), ("42", 42), (" 7 ", 7), ("+5", 5), ("100", 100)])
def test_parse_int_accepts_integers(raw, expected):
    assert validation.parse_int("limit", raw, default=20, minimum=1, maximum=100) == expected


@pytest.mark.parametrize("raw", ["101", "1000", "999999999999999999", "99999999999999999999", "1" * 5000])
def test_parse_int_clamps_to_the_maximum(raw):
    assert validation.parse_int("limit", raw, default=20, minimum=1, maximum=100) == 100


@pytest.mark.parametrize("value", [123456789012, 2**63, 2**64, 10**40, 10**3999])
def test_parse_int_without_maximum_is_unbounded(value):
    assert validation.parse_int("start_id", str(value), default=0, minimum=0) == value
    assert validation.parse_int("start_id", "+000" + str(value), default=0, minimum=0) == value


@pytest.mark.parametrize("raw", ["-99999999999999999999", "-" + "9" * 5000])
def test_parse_int_huge_negative_is_below_the_minimum(raw):
    err = bad_request(validation.parse_int, "limit", raw, default=20, minimum=1, maximum=100)
    assert ">= 1" in err.message and len(err.message) < 200


def test_parse_int_without_maximum_refuses_more_digits_than_it_converts():
    err = bad_request(validation.parse_int, "start_id", "1" * 5000, default=0, minimum=0)
    assert "digits" in err.message and len(err.message) < 200


@pytest.mark.parametrize("raw", ["x", "1.5", "1e3", "0x10", "1 2", "--1", "١٢x", "1_000", "nan", "inf",
                                 "١٢", "²", "１", "5\n5", "+", "-", "1-"])
def test_parse_int_rejects_what_is_not_an_integer(raw):
    err = bad_request(validation.parse_int, "limit", raw, default=20, minimum=1, maximum=100)
    assert "limit" in err.message
    assert err.code == "bad_request"


@pytest.mark.parametrize(("raw", "minimum"), [("0", 1), ("-1", 1), ("-1", 0), ("-2", -1)])
def test_parse_int_rejects_values_below_the_minimum(raw, minimum):
    err = bad_request(validation.parse_int, "n", raw, default=5, minimum=minimum)
    assert f">= {minimum}" in err.message


def test_parse_int_message_does_not_echo_a_huge_value():
    err = bad_request(validation.parse_int, "limit", "x" * 10_000, default=1, minimum=1)
    assert len(err.message) < 200


# resume_point ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "query", "expected"), [
    (None, None, -1),
    (None, "", -1),
    ("", "", -1),
    ("  ", None, -1),
    (None, "-1", -1),
    (None, "0", 0),
    (None, "17", 17),
    ("5", None, 5),
    ("5", "9", 5),       # the header wins
    ("-1", "9", -1),     # even when it says "from the beginning"
    ("", "9", 9),        # an empty header is as if it were absent
    ("  ", "3", 3),
    (" 8 ", "3", 8),
])
def test_resume_point(header, query, expected):
    assert validation.resume_point(header, query) == expected


@pytest.mark.parametrize(("header", "query", "name"), [
    (None, "-2", "latest_event_id"),
    (None, "x", "latest_event_id"),
    (None, "1.0", "latest_event_id"),
    ("-2", "5", "Last-Event-ID"),
    ("abc", "5", "Last-Event-ID"),
    ("abc", None, "Last-Event-ID"),
])
def test_resume_point_rejects_bad_values(header, query, name):
    err = bad_request(validation.resume_point, header, query)
    assert name in err.message


def test_resume_point_ignores_the_query_when_the_header_is_sent():
    assert validation.resume_point("3", "garbage") == 3


# providers_set --------------------------------------------------------------------------------

KNOWN = ("bitbucket", "github", "gitlab")


@pytest.mark.parametrize(("raw", "expected"), [
    (None, []),
    ("", []),
    (",,", []),
    (" , ", []),
    ("github", ["github"]),
    ("gitlab,github", ["github", "gitlab"]),
    ("github,github,gitlab,github", ["github", "gitlab"]),
    (" github , ,bitbucket,", ["bitbucket", "github"]),
])
def test_providers_set(raw, expected):
    assert validation.providers_set(raw, KNOWN) == expected


@pytest.mark.parametrize("raw", ["svn", "github,svn", "GitHub", "github;gitlab"])
def test_providers_set_rejects_unknown_providers(raw):
    err = bad_request(validation.providers_set, raw, KNOWN)
    assert "provider" in err.message


def test_providers_set_uses_the_list_given():
    assert validation.providers_set("gitea", ["gitea"]) == ["gitea"]
    bad_request(validation.providers_set, "github", ["gitea"])


# decode_json_object ---------------------------------------------------------------------------


def test_decode_json_object_keeps_key_order_and_values():
    body = '{"z": 1, "a": {"y": [1, 2.5, null, true], "b": "é✓😀"}, "m": ""}'.encode()
    value = validation.decode_json_object(body)
    assert list(value) == ["z", "a", "m"]
    assert list(value["a"]) == ["y", "b"]
    assert value == {"z": 1, "a": {"y": [1, 2.5, None, True], "b": "é✓😀"}, "m": ""}


@pytest.mark.parametrize("body", [b"", b"   ", b"\n\t"])
def test_decode_json_object_rejects_an_empty_body(body):
    err = bad_request(validation.decode_json_object, body)
    assert err.code == "invalid_json"
    assert "empty" in err.message


@pytest.mark.parametrize("body", [
    b"{", b"{'a': 1}", b"nope", b'{"a": NaN}', b"{\"a\": 1e400}", b"\xff\xfe", b'{"a": "\\ud800"}',
    b"[" * 100_000, b'{"a":' * 100_000,
])
def test_decode_json_object_rejects_invalid_json(body):
    err = bad_request(validation.decode_json_object, body)
    assert err.code == "invalid_json"
    assert len(err.message) < 200


@pytest.mark.parametrize("body", [b"[]", b"[{}]", b'"text"', b"1", b"null", b"true"])
def test_decode_json_object_rejects_what_is_not_an_object(body):
    err = bad_request(validation.decode_json_object, body)
    assert err.code == "invalid_json"
    assert "object" in err.message


# conversation_fields and conversation_title ---------------------------------------------------


def test_conversation_fields_all_absent():
    assert validation.conversation_fields({}) == (None, None, None)


def test_conversation_fields_all_given():
    body = {"initial_user_msg": "hi", "repository": "octo-org/my.repo_1", "selected_branch": "feature/x"}
    assert validation.conversation_fields(body) == ("hi", "octo-org/my.repo_1", "feature/x")


def test_conversation_fields_null_and_empty_are_absent():
    body = {"initial_user_msg": None, "repository": "", "selected_branch": ""}
    assert validation.conversation_fields(body) == (None, None, None)
    assert validation.conversation_fields({"repository": None, "selected_branch": None}) == (None, None, None)


def test_conversation_fields_ignores_unknown_fields():
    assert validation.conversation_fields({"other": [1, 2]}) == (None, None, None)


@pytest.mark.parametrize("repository", [
    "nope", "a/b/c", "/name", "owner/", "own er/name", "owner/na me", "owner/name\n", "ö/x", "a" * 101 + "/b",
    "../x", "a/..", "./a", "owner/.",
])
def test_conversation_fields_rejects_bad_repositories(repository):
    err = bad_request(validation.conversation_fields, {"repository": repository})
    assert "owner/name" in err.message


@pytest.mark.parametrize("field", ["initial_user_msg", "repository", "selected_branch"])
@pytest.mark.parametrize("value", [1, 1.5, True, [], {}, ["a/b"]])
def test_conversation_fields_rejects_non_strings(field, value):
    err = bad_request(validation.conversation_fields, {field: value})
    assert field in err.message


@pytest.mark.parametrize("branch", ["x" * 256, "main\n", "a\x00b", "\t"])
def test_conversation_fields_rejects_bad_branches(branch):
    err = bad_request(validation.conversation_fields, {"selected_branch": branch})
    assert "selected_branch" in err.message


def test_conversation_fields_accepts_a_branch_of_the_maximum_length():
    assert validation.conversation_fields({"selected_branch": "b" * 255})[2] == "b" * 255


@pytest.mark.parametrize(("message", "title"), [
    ("Fix the bug", "Fix the bug"),
    ("  first line  \nsecond", "first line"),
    ("\n\n  later\nmore", "later"),  # leading blank lines are skipped
    ("x" * 80, "x" * 80),
    ("x" * 81, "x" * 79 + "…"),
])
def test_conversation_title_from_the_first_line(message, title):
    assert validation.conversation_title(message, "abcdefghijkl") == title


@pytest.mark.parametrize("message", [None, "", "   ", "\n \n"])
def test_conversation_title_from_the_id(message):
    assert validation.conversation_title(message, "abcdefghijkl") == "Conversation abcdefgh"


# action ---------------------------------------------------------------------------------------


def test_action_with_type_keeps_every_field_in_order():
    body = {"type": "user_message", "content": "hello", "extra": {"b": 1, "a": [1, {"x": None}]}, "n": 1.5}
    fields = validation.action(body)
    assert fields == body
    assert list(fields) == ["type", "content", "extra", "n"]


def test_action_in_openhands_form():
    body = {"action": "message", "args": {"content": "hi", "image_urls": []}}
    assert validation.action(body) == body


@pytest.mark.parametrize("kind", ["a", "x" * 64, "run_cmd_2", "0", "_"])
def test_action_kind_pattern_accepts(kind):
    assert validation.action({"type": kind})["type"] == kind
    assert validation.action({"action": kind})["action"] == kind


@pytest.mark.parametrize("kind", ["", "x" * 65, "Run", "run-cmd", "run cmd", "ü", "run\n", 1, None, ["a"], {"a": 1}])
@pytest.mark.parametrize("field", ["type", "action"])
def test_action_kind_pattern_rejects(field, kind):
    err = bad_request(validation.action, {field: kind})
    assert f"'{field}'" in err.message


def test_action_needs_a_kind():
    err = bad_request(validation.action, {"content": "hi"})
    assert "type" in err.message
    bad_request(validation.action, {})


def test_action_type_wins_over_action():
    # With both, `type` names the kind; `action` is then an ordinary field, kept as given.
    assert validation.action({"type": "note", "action": "Not A Kind"}) == {"type": "note", "action": "Not A Kind"}
    bad_request(validation.action, {"type": "Bad", "action": "message", "args": {"content": "x"}})


@pytest.mark.parametrize("content", [None, "", 1, ["hi"], {"text": "hi"}])
def test_user_message_needs_non_empty_string_content(content):
    body = {"type": "user_message"} if content is None else {"type": "user_message", "content": content}
    err = bad_request(validation.action, body)
    assert "content" in err.message


@pytest.mark.parametrize("args", [None, "hi", [], {}, {"content": ""}, {"content": 5}, {"text": "hi"}])
def test_message_action_needs_non_empty_string_args_content(args):
    body = {"action": "message"} if args is None else {"action": "message", "args": args}
    err = bad_request(validation.action, body)
    assert "args.content" in err.message


def test_other_kinds_need_no_content():
    assert validation.action({"type": "agent_note"}) == {"type": "agent_note"}
    run = {"action": "run", "args": {"command": "ls"}}
    assert validation.action(run) == run
    assert validation.action({"type": "message", "content": ""}) == {"type": "message", "content": ""}


@pytest.mark.parametrize(("field", "value"), [
    ("id", 3), ("id", None), ("timestamp", "2026-01-01T00:00:00+00:00"), ("source", "agent"),
    ("source", "environment"), ("source", None), ("source", "User"), ("source", ["user"]),
])
def test_server_fields_cannot_be_posted(field, value):
    err = bad_request(validation.action, {"type": "user_message", "content": "x", field: value})
    assert f"'{field}'" in err.message


def test_source_user_is_accepted_and_dropped():
    # The server sets `source` itself; a posted "user" is harmless and replaced.
    assert validation.action({"type": "user_message", "source": "user", "content": "x"}) == {
        "type": "user_message", "content": "x",
    }


def test_action_does_not_modify_the_body():
    body = {"type": "user_message", "source": "user", "content": "x"}
    validation.action(body)
    assert body == {"type": "user_message", "source": "user", "content": "x"}


# idempotency_key and body_digest --------------------------------------------------------------


def test_idempotency_key_absent():
    assert validation.idempotency_key(None) is None


@pytest.mark.parametrize("raw", ["a", "retry-1 of 2", "k" * 255, "~!@#$%^&*()"])
def test_idempotency_key_is_hashed(raw):
    digest = validation.idempotency_key(raw)
    assert digest == hashlib.sha256(raw.encode()).hexdigest()
    assert raw not in digest or len(raw) < 2


@pytest.mark.parametrize("raw", ["", "k" * 256, "tab\there", "new\nline", "\x00", "é", "😀"])
def test_idempotency_key_rejects_bad_values(raw):
    err = bad_request(validation.idempotency_key, raw)
    assert "Idempotency-Key" in err.message


def test_body_digest_tells_bodies_apart():
    assert validation.body_digest(b'{"a":1}') == validation.body_digest(b'{"a":1}')
    assert validation.body_digest(b'{"a":1}') != validation.body_digest(b'{"a":2}')
    assert len(validation.body_digest(b"")) == 32
