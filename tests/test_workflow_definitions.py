"""Workflow definitions: the builder and config.yaml give the same value; bad ones are refused."""

from __future__ import annotations

import pytest

from monitor.config import ConfigError, config_warnings, parse_config
from monitor.convert import definition_from_config
from workflows import DefinitionError, Retry, Workflow, call, publish, wait_for

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


def test_the_builder_and_the_config_give_the_same_definition() -> None:
    built = (
        Workflow("GrantPayment", deadline="2d")
        .step(
            "validate",
            call("applications", "POST", "/validate"),
            retry=Retry(max_attempts=5, backoff=2.0),
        )
        .step(
            "pay",
            call("ach", "POST", "/transfers", body={"amount": "{input.amount}"}),
            compensate=call("ach", "POST", "/transfers/{steps.pay.payment_id}/cancel"),
        )
        .step("docs", wait_for("docs.validated", match={"id": "{input.id}"}, timeout="1h"))
        .step("notify", publish("grant.paid"), delay="1h")
        .build()
    )
    assert definition_from_config(parse_config(YAML).workflows[0]) == built


def test_the_builder_refuses_duplicates_and_unknown_references() -> None:
    with pytest.raises(DefinitionError) as error:
        (
            Workflow("W")
            .step("a", call("s", path="/{steps.b.id}"))
            .step("b", call("s"))
            .step("b", call("s"))
            .build()
        )
    problems = error.value.problems
    assert any("refers to step 'b', which does not run before" in p for p in problems)
    assert any("W.b: duplicate step name" in p for p in problems)


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
