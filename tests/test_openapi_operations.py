"""The shape of every operation in /openapi.json, pinned: path, method, operation id,
statuses, parameters, security and media types. Routes are declared once and the document is
generated from them (monitor/http/route.py); this keeps the generated document answering what
the hand-written one did. Only schema names may change, so schemas are not compared.

Regenerate tests/data/openapi-operations.json only for a deliberate change of the API:
`python -m tests.test_openapi_operations > tests/data/openapi-operations.json`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from monitor import Config
from monitor.http.document import openapi_document
from monitor.http.route import Reply, RouteTable

from .conftest import AppClient

GOLDEN = Path(__file__).parent / "data" / "openapi-operations.json"
TOKEN = "golden-admin-token-1"
SECTIONS: dict[str, Any] = {
    "server": {"auth": {"tokens": [{"name": "token", "token": TOKEN, "scopes": ["*"]}]}},
    "services": [
        {
            "name": "payments",
            "instances": [{"id": "p1", "url": "http://127.0.0.1:9"}],
            "slos": [{"name": "availability", "objective": 99.9}],
        }
    ],
    "workflows": [
        {
            "name": "Grant",
            "route": "/api/grants",
            "steps": [{"name": "later", "delay": "1h", "publish": "grant.done"}],
        }
    ],
}


def operations(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One plain record per operation, sorted by path and method."""
    records = []
    for path, item in sorted(document["paths"].items()):
        shared = item.get("parameters", [])
        for method, operation in sorted(item.items()):
            if method == "parameters":
                continue
            parameters = shared + operation.get("parameters", [])
            responses = operation["responses"]
            records.append(
                {
                    "path": path,
                    "method": method,
                    "operationId": operation["operationId"],
                    "statuses": sorted(responses),
                    "parameters": sorted([p["name"], p["in"]] for p in parameters),
                    "security": "security" in operation,
                    "requestBody": sorted(operation.get("requestBody", {}).get("content", {})),
                    "responses": {
                        status: sorted(answer.get("content", {}))
                        for status, answer in sorted(responses.items())
                    },
                }
            )
    return records


async def test_every_operation_keeps_its_shape(
    make_config: Callable[..., Config], start_daemon: Callable[..., Awaitable[AppClient]]
) -> None:
    daemon = await start_daemon(make_config(**SECTIONS))
    resp = await daemon.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    assert operations(await resp.json()) == json.loads(GOLDEN.read_text())


class Greeting(BaseModel):
    text: str


class Who(BaseModel):
    name: str = Field(default="", description="whom to greet")


demo = RouteTable()


class Demo:
    @demo.get(
        "/hello/{lang}",
        operation_id="hello",
        summary="Greet",
        query=Who,
        replies=(Reply(status=200, model=Greeting),),
        errors=(404,),
        scope="greet",
    )
    async def hello(self, request: web.Request) -> web.Response:
        return web.json_response({"text": "hi"})

    @demo.get(
        "/up", operation_id="up", summary="Up", replies=(Reply(status=204, body=False),), shed=False
    )
    async def up(self, request: web.Request) -> web.Response:
        return web.Response(status=204)


def test_routes_are_bound_to_the_plain_handlers() -> None:
    owner = Demo()
    bound = demo.bind(owner)
    assert [route.operation_id for route, _ in bound] == ["hello", "up"]
    assert [definition.handler for _, definition in bound] == [owner.hello, owner.up]


def test_a_declaration_becomes_its_operation() -> None:
    document = openapi_document(demo.routes, version="1")
    hello = document["paths"]["/hello/{lang}"]["get"]
    assert hello["security"] == [{"bearer": []}]
    assert [(p["name"], p["in"]) for p in hello["parameters"]] == [
        ("lang", "path"),
        ("name", "query"),
    ]
    assert hello["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Greeting"
    }
    assert sorted(hello["responses"]) == ["200", "401", "403", "404", "503"]
    assert document["paths"]["/up"]["get"]["responses"] == {"204": {"description": "OK"}}
    assert {"Greeting", "Error"} <= set(document["components"]["schemas"])


if __name__ == "__main__":
    import yaml

    from monitor import parse_config
    from monitor.app import openapi_document

    document = openapi_document(parse_config(yaml.safe_dump(SECTIONS)))
    print(json.dumps(operations(document), indent=1))
