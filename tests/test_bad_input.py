"""Every malformed request gets a 4xx in the JSON error shape, stores nothing, harms nothing."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from monitor.config import Config
from monitor.keys import CONFIG

from .conftest import AppClient
from .test_registry import PAYMENTS_1

GOOD = {"url": "http://127.0.0.1:8001"}


def meta_pairs(count: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(count)}


BAD_BODIES: list[tuple[str, bytes | Any, int]] = [
    ("malformed json", b'{"url": "http://a:1"', 400),
    ("invalid utf-8", b'{"url": "\xff\xfe"}', 400),
    ("empty body", b"", 400),
    ("deeply nested json", b"[" * 100_000 + b"]" * 100_000, 400),
    ("not an object", [1, 2], 422),
    ("missing url", {"tags": ["a"]}, 422),
    ("url not http", {"url": "ftp://127.0.0.1/x"}, 422),
    ("url without host", {"url": "http://"}, 422),
    ("url of wrong type", {"url": 42}, 422),
    ("tags of wrong type", {**GOOD, "tags": "tier1"}, 422),
    ("meta values not strings", {**GOOD, "meta": {"a": 1}}, 422),
    ("meta over 64 pairs", {**GOOD, "meta": meta_pairs(65)}, 422),
    ("meta key not a label", {**GOOD, "meta": {"bad-key": "v"}}, 422),
    ("unknown field", {**GOOD, "colour": "red"}, 422),
    ("ttl not a duration", {**GOOD, "ttl": "30"}, 422),
    ("ttl below a second", {**GOOD, "ttl": "10ms"}, 422),
    ("probe with unknown key", {**GOOD, "probe": {"intervall": "10s"}}, 422),
    ("probe of unknown type", {**GOOD, "probe": {"type": "icmp"}}, 422),
]


@pytest.mark.parametrize(("case", "body", "status"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
async def test_bad_registration_body_is_refused(
    daemon: AppClient, case: str, body: bytes | Any, status: int
) -> None:
    data = body if isinstance(body, bytes) else None
    resp = await daemon.put(PAYMENTS_1, data=data, json=None if data is not None else body)
    assert resp.status == status
    error = (await resp.json())["error"]
    assert error["code"] and error["message"]
    await assert_nothing_stored(daemon)


async def test_meta_of_exactly_64_pairs_is_accepted(daemon: AppClient) -> None:
    resp = await daemon.put(PAYMENTS_1, json={**GOOD, "meta": meta_pairs(64)})
    assert resp.status == 201


async def test_field_errors_name_the_field(daemon: AppClient) -> None:
    resp = await daemon.put(PAYMENTS_1, json={"url": "ftp://x", "ttl": "soon"})
    details = (await resp.json())["error"]["details"]
    assert {d["field"] for d in details} == {"url", "ttl"}


BAD_NAMES = [
    ("pay ments", "p1"),
    ("payments", "p/1"),
    ("pay%24", "p1"),
    ("x" * 129, "p1"),
    ("payments", "y" * 129),
]


@pytest.mark.parametrize(("service", "instance_id"), BAD_NAMES)
async def test_bad_names_are_refused(daemon: AppClient, service: str, instance_id: str) -> None:
    resp = await daemon.put(f"/v1/services/{service}/instances/{instance_id}", json=GOOD)
    assert resp.status in (400, 404)
    assert "error" in await resp.json()
    await assert_nothing_stored(daemon)


async def test_names_of_128_characters_are_accepted(daemon: AppClient) -> None:
    resp = await daemon.put(f"/v1/services/{'s' * 128}/instances/{'i' * 128}", json=GOOD)
    assert resp.status == 201


async def test_body_over_one_mebibyte_is_413(daemon: AppClient) -> None:
    huge = b'{"url": "http://127.0.0.1:1", "meta": {"a": "' + b"x" * (1024 * 1024) + b'"}}'
    resp = await daemon.put(PAYMENTS_1, data=huge)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "body_too_large"
    await assert_nothing_stored(daemon)


@pytest.mark.parametrize(
    "query",
    [{"health": "great"}, {"index": "-1"}, {"index": "abc"}, {"index": "1", "wait": "forever"}],
)
async def test_bad_query_parameters_are_400(daemon: AppClient, query: dict[str, str]) -> None:
    resp = await daemon.get("/v1/services/payments", params=query)
    assert resp.status == 400
    assert "error" in await resp.json()


async def test_unknown_route_and_method_answer_in_the_error_shape(daemon: AppClient) -> None:
    missing = await daemon.get("/v1/nothing")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    wrong = await daemon.patch(PAYMENTS_1, json=GOOD)
    assert wrong.status == 405
    assert (await wrong.json())["error"]["code"] == "method_not_allowed"


async def assert_nothing_stored(daemon: AppClient) -> None:
    """Nothing registered, and the daemon still serves a good request."""
    body = await (await daemon.get("/v1/services")).json()
    assert body["services"] == []
    assert (await daemon.get("/healthz")).status == 200


# -- bodies on every route that stores JSON: one decoder bounds them all ------------------

TOKEN = "admin-token-for-bad-input"
ROUTED = {
    "name": "Grant",
    "route": "/api/grants",
    "steps": [{"name": "later", "delay": "1h", "publish": "grant.done"}],
}


@pytest.fixture
async def routed(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> AppClient:
    auth = {"tokens": [{"name": "token", "token": TOKEN, "scopes": ["*"]}]}
    return await start_daemon(make_config(server={"auth": auth}, workflows=[ROUTED]))


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def start_body(input_: bytes) -> bytes:
    return b'{"input": ' + input_ + b"}"


JSON_WRITES = [
    ("POST", "/api/grants", lambda body: body),
    ("POST", "/v1/workflows/Grant", start_body),
    ("POST", "/v1/events/grant.submitted", lambda body: body),
    ("PUT", PAYMENTS_1, lambda body: body),
]
UNSTORABLE: list[tuple[str, bytes, int]] = [
    ("nested 65 deep", nested(65), 400),
    ("nested 300 deep", nested(300), 400),
    ("nested 1,000 deep", nested(1000), 400),
    ("integer beyond 64 bits", b'{"amount": 123456789012345678901234567890}', 422),
    ("negative integer beyond 64 bits", b'{"amount": -9223372036854775809}', 422),
    ("number beyond a double", b'{"amount": 1e400}', 400),
    ("NaN", b'{"amount": NaN}', 400),
    ("lone surrogate", b'{"a": "\\ud800"}', 400),
]


@pytest.mark.parametrize(("method", "path", "wrap"), JSON_WRITES, ids=[w[1] for w in JSON_WRITES])
@pytest.mark.parametrize(("case", "body", "status"), UNSTORABLE, ids=[u[0] for u in UNSTORABLE])
async def test_json_the_daemon_could_not_store_is_4xx_on_every_write_route(
    routed: AppClient,
    method: str,
    path: str,
    wrap: Callable[[bytes], bytes],
    case: str,
    body: bytes,
    status: int,
) -> None:
    resp = await routed.request(
        method, path, data=wrap(body), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert resp.status == status, case
    error = (await resp.json())["error"]
    assert error["code"] and error["message"]
    await assert_nothing_stored_anywhere(routed)


async def test_json_nested_64_deep_with_64_bit_integers_is_stored(routed: AppClient) -> None:
    deep = b'{"a":' * 63 + b"[18446744073709551615, -9223372036854775808]" + b"}" * 63
    resp = await routed.post("/api/grants", data=deep, headers=AUTH)
    assert resp.status == 202, await resp.text()
    process = await (await routed.get(f"/v1/processes/{(await resp.json())['id']}")).json()
    value = process["input"]
    for _ in range(63):
        value = value["a"]
    assert value == [18446744073709551615, -9223372036854775808]


UNDECLARED_TYPES: list[tuple[str, str, bytes]] = [
    ("text", "text/plain", b'{"amount": 1}'),
    ("html", "text/html; charset=utf-8", b"<p>{}</p>"),
    ("multipart", "multipart/form-data; boundary=xx", b"--xx\r\n\r\n{}\r\n--xx--\r\n"),
    ("xml", "application/xml", b"<a/>"),
    ("form", "application/x-www-form-urlencoded", b"input=1&amount=2"),
]


@pytest.mark.parametrize(
    ("method", "path"), [w[:2] for w in JSON_WRITES], ids=[w[1] for w in JSON_WRITES]
)
@pytest.mark.parametrize(
    ("case", "content_type", "body"), UNDECLARED_TYPES, ids=[u[0] for u in UNDECLARED_TYPES]
)
async def test_bodies_that_are_not_json_are_4xx_whatever_their_type(
    routed: AppClient, method: str, path: str, case: str, content_type: str, body: bytes
) -> None:
    resp = await routed.request(
        method, path, data=body, headers={**AUTH, "Content-Type": content_type}
    )
    assert resp.status == (400 if case == "form" else 415), case
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["message"]
    await assert_nothing_stored_anywhere(routed)


async def test_json_sent_as_a_form_is_still_json(routed: AppClient) -> None:
    """`curl -d '{...}'` labels its body application/x-www-form-urlencoded."""
    form = {"Content-Type": "application/x-www-form-urlencoded", **AUTH}
    resp = await routed.post("/v1/events/grant.submitted", data=b'{"a": 1}', headers=form)
    assert resp.status == 202


MALFORMED_FORMS: list[tuple[str, str, bytes]] = [
    ("invalid utf-8", "application/x-www-form-urlencoded", b"token=\xff\xfe"),
    ("unknown charset", "application/x-www-form-urlencoded; charset=klingon", b"token=a"),
    ("multipart without boundary", "multipart/form-data", b"token=a"),
    ("broken multipart", "multipart/form-data; boundary=zz", b"--zz\r\nnonsense"),
    ("json", "application/json", b'{"token": "' + TOKEN.encode() + b'"}'),
]


@pytest.mark.parametrize(
    ("case", "content_type", "body"), MALFORMED_FORMS, ids=[m[0] for m in MALFORMED_FORMS]
)
async def test_a_malformed_sign_in_form_is_4xx_and_signs_nobody_in(
    routed: AppClient, case: str, content_type: str, body: bytes
) -> None:
    resp = await routed.post(
        "/login", data=body, headers={"Content-Type": content_type}, allow_redirects=False
    )
    assert 400 <= resp.status < 500, case
    assert "hms_session" not in resp.cookies


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("a field without =", TOKEN.encode()),
        ("an empty field", b"token=" + TOKEN.encode() + b"&&next=/"),
        (
            "too many fields",
            b"&".join(b"f%d=1" % i for i in range(17)) + b"&token=" + TOKEN.encode(),
        ),
        ("invalid utf-8", b"token=\xff\xfe"),
    ],
    ids=["field without =", "empty field", "too many fields", "invalid utf-8"],
)
async def test_a_malformed_sign_in_form_is_a_400_that_does_not_quote_it(
    routed: AppClient, case: str, body: bytes
) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    resp = await routed.post("/login", data=body, headers=form, allow_redirects=False)
    assert resp.status == 400, case
    error = (await resp.json())["error"]
    assert error["message"].startswith("malformed form body"), error
    assert TOKEN not in error["message"]
    assert "hms_session" not in resp.cookies


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def assert_nothing_stored_anywhere(client: AppClient) -> None:
    """No instance, no process, no event in the database; the daemon still serves."""
    await assert_nothing_stored(client)
    processes = await (await client.get("/v1/processes")).json()
    assert processes["processes"] == []
    database = client.app[CONFIG].storage.path
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)
