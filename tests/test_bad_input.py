"""Every malformed request gets a 4xx in the JSON error shape, stores nothing, harms nothing."""

from __future__ import annotations

from typing import Any

import pytest

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
