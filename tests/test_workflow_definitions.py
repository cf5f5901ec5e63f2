"""Workflow definitions: config.yaml and the same entry as JSON (PUT /v1/workflows/{name})
give the same value; bad ones are refused naming the key. The Python builder is the SDK's."""

from __future__ import annotations

import orjson
import pytest

from monitor.config import ConfigError, config_warnings, parse_config
from monitor.convert import definition_from_config, definition_from_json
from workflows import Publish, Retry, WaitFor
from workflows.errors import InvalidDefinition

YAML = """\
workflows:
  - name: GrantPayment
    deadline: 2d
    steps:
      - name: validate
        call: {service: applications, method: POST, path: /validate}
        retry: {max_attempts: 5, backoff: 2s}
      - name: pay
        call: {service: ach, path: /transfers, body: {amount: "{input.amount}"}}
        compensate: {service: ach, path: "/transfers/{steps.pay.payment_id}/cancel"}
      - name: docs
        wait_for: {event: docs.validated, match: {id: "{input.id}"}, timeout: 1h}
      - name: notify
        delay: 1h
        publish: grant.paid
"""


GRANT_JSON = {
    "name": "GrantPayment",
    "deadline": "48h",  # another spelling of 2d: the same definition
    "steps": [
        {
            "name": "validate",
            "call": {"service": "applications", "method": "POST", "path": "/validate"},
            "retry": {"max_attempts": 5, "backoff": "2000ms"},
        },
        {
            "name": "pay",
            "call": {"service": "ach", "path": "/transfers", "body": {"amount": "{input.amount}"}},
            "compensate": {"service": "ach", "path": "/transfers/{steps.pay.payment_id}/cancel"},
        },
        {
            "name": "docs",
            "wait_for": {"event": "docs.validated", "match": {"id": "{input.id}"}, "timeout": "1h"},
        },
        {"name": "notify", "delay": "60m", "publish": "grant.paid"},
    ],
}


def test_config_yaml_and_its_json_give_the_same_definition() -> None:
    from_yaml = definition_from_config(parse_config(YAML).workflows[0])
    from_json = definition_from_json(GRANT_JSON)
    assert from_json == from_yaml
    assert from_json.deadline == 2 * 86400 and from_json.steps[0].retry.max_attempts == 5
    assert isinstance(from_json.steps[2].action, WaitFor)
    assert from_json.steps[2].action.timeout == 3600


def test_a_definition_reads_back_from_its_stored_json() -> None:
    definition = definition_from_config(parse_config(YAML).workflows[0])
    assert definition.spec is not None
    again = definition_from_json(orjson.loads(orjson.dumps(definition.spec)))
    assert again == definition and again.same_as(definition)
    changed = definition_from_json({**GRANT_JSON, "deadline": "3d"})
    assert not changed.same_as(definition)


def test_json_definitions_are_refused_with_the_path_of_each_bad_field() -> None:
    steps = [
        {"name": "a", "call": {"service": "s", "path": "/{steps.b.id}"}},
        {"name": "b", "call": {"service": "s", "path": "/"}},
        {"name": "b", "wait_for": {"event": "e", "signal": "s"}},
        {"name": "c", "publish": "t", "data": {"who": "{process.name}"}},
    ]
    with pytest.raises(InvalidDefinition) as error:
        definition_from_json({"name": "W", "steps": steps, "respond_after": "z"})
    problems = dict(error.value.problems)
    assert "refers to step 'b', which does not run before" in problems["steps.0.call.path"]
    assert problems["steps.2"] == "duplicate name 'b'"
    assert problems["steps.2.wait_for"] == "wait_for needs exactly one of event, signal"
    assert "{process.name} must start with input." in problems["steps.3.data"]
    assert problems["respond_after"] == "no step named 'z' in this workflow"


def test_templates_may_name_the_process() -> None:
    definition = definition_from_json(
        {
            "name": "W",
            "output": {"id": "{process.id}", "paid": "{steps.pay.ok}"},
            "steps": [
                {"name": "pay", "call": {"service": "s", "path": "/p/{process.id}"}},
                {"name": "tell", "publish": "paid", "data": {"process": "{process.id}"}},
            ],
        }
    )
    assert definition.output == {"id": "{process.id}", "paid": "{steps.pay.ok}"}
    assert isinstance(definition.steps[1].action, Publish)
    assert definition.steps[1].action.data == {"process": "{process.id}"}


def test_config_template_errors_name_the_key_and_line() -> None:
    bad = YAML.replace("{steps.pay.payment_id}", "{steps.notify.id}").replace(
        '"{input.amount}"', '"{amount}"'
    )
    with pytest.raises(ConfigError) as error:
        parse_config(bad, source="config.yaml")
    assert error.value.errors == [
        "config.yaml:9: workflows[0].steps[1].call.body: {amount} must start with input. or "
        "steps.<step>., or be process.id",
        "config.yaml:10: workflows[0].steps[1].compensate.path: {steps.notify.id} refers to "
        "step 'notify', which does not run before",
    ]


def test_unknown_services_are_warnings_not_errors() -> None:
    warnings = config_warnings(parse_config(YAML))
    assert any("'ach' is not configured" in w for w in warnings)


def test_backoff_grows_by_the_factor_up_to_the_cap_with_jitter() -> None:
    retry = Retry(max_attempts=10, backoff=1.0, factor=2.0, max_backoff=5.0)
    assert [retry.delay(n, 0.999999) for n in (1, 2, 3, 4)] == pytest.approx([1, 2, 4, 5])
    assert retry.delay(3, 0.0) == pytest.approx(2.0)  # never under half the step
