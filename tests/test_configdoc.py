"""docs/configuration.md is generated from the config models and cannot drift from them."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, Field

from monitor.commands.configdoc import COMMAND, render

from .processes import ROOT

REFERENCE = ROOT / "docs" / "configuration.md"


def rows(markdown: str) -> dict[str, list[str]]:
    """The reference's table rows by key: type, default, description."""
    found = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            found[cells[0].strip("`")] = cells[1:]
    return found


def test_the_committed_reference_is_the_generated_one() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == render(), f"run `{COMMAND}`"


def test_every_key_of_the_reference_has_a_type_default_and_description() -> None:
    reference = rows(render())
    assert "server.listen" in reference
    assert "workflows[].steps[].wait_for.timeout" in reference
    undescribed = [key for key, (kind, default, text) in reference.items() if not text]
    assert undescribed == [], "add Field(description=...) to these keys in monitor/config.py"


class Budget(BaseModel):
    per_second: float = Field(default=100.0, gt=0, description="Probes started per second.")


class Extended(BaseModel):
    listen: str = Field(default="127.0.0.1:9797", description="Where to listen.")
    grace: timedelta = Field(default=timedelta(seconds=90), description="How long to wait.")
    budgets: tuple[Budget, ...] = Field(default=(), description="Probe budgets.")


def test_a_new_key_is_documented_from_its_field_alone() -> None:
    reference = rows(render(Extended))
    assert reference["grace"] == ["duration", "`1m30s`", "How long to wait."]
    assert reference["budgets"][0] == "list of [Budget](#budgets)"
    assert reference["budgets[].per_second"] == [
        "number (> 0)",
        "`100.0`",
        "Probes started per second.",
    ]
