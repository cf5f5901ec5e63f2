"""Templates in step paths and bodies: `{input.amount}`, `{steps.pay.payment_id}`,
`{process.id}` (so a service can name the process in its reply).

A string that is one whole reference keeps the referenced value's JSON type
(`"{input.amount}"` with amount 12.5 renders 12.5, not "12.5"); references
inside a longer string are interpolated as text. `{{` and `}}` are literal
braces. References are checked when a definition is loaded: `input.*`, `process.id` and
`steps.<an earlier step>.*` only, so a typo is a config error, not a failed
process at 3 a.m.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

REFERENCE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_WHOLE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+|\[\d+\])*")
_TOKEN = re.compile(r"\.?([A-Za-z0-9_-]+)|\[(\d+)\]")


class TemplateError(ValueError):
    """A reference that cannot be resolved (at load: unknown; at run: missing value)."""


def references(value: Any) -> Iterator[str]:
    """Every `{...}` reference in a string or a nested body."""
    if isinstance(value, str):
        for match in REFERENCE.finditer(value):
            if match.group(1) is not None:
                yield match.group(1).strip()
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from references(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from references(item)


def check(value: Any, earlier_steps: frozenset[str] | set[str]) -> list[str]:
    """Problems with the references in `value`, given the steps that run before it."""
    problems = []
    for reference in references(value):
        parts = _split(reference)
        if parts is None:
            problems.append(
                f"{{{reference}}} is not a reference (input.x, steps.<step>.x or process.id)"
            )
        elif parts[0] == "input" or parts == ["process", "id"]:
            continue
        elif parts[0] == "steps" and len(parts) >= 2 and isinstance(parts[1], str):
            if parts[1] not in earlier_steps:
                problems.append(
                    f"{{{reference}}} refers to step {parts[1]!r}, which does not run before"
                )
        else:
            problems.append(
                f"{{{reference}}} must start with input. or steps.<step>., or be process.id"
            )
    return problems


def render(value: Any, context: Mapping[str, Any], *, strict: bool = True) -> Any:
    """`value` with its references filled from `context` ({"input": ..., "steps": ...}).

    Not `strict`: a reference without a value renders as null (an `output:` template
    read before every step has run, or a field a step did not return)."""
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value)
        if whole is not None and whole.group(1) is not None:
            return _lookup(whole.group(1).strip(), context, strict)
        return REFERENCE.sub(lambda m: _text(m, context, strict), value)
    if isinstance(value, Mapping):
        return {key: render(item, context, strict=strict) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [render(item, context, strict=strict) for item in value]
    return value


def _text(match: re.Match[str], context: Mapping[str, Any], strict: bool) -> str:
    if match.group(0) == "{{":
        return "{"
    if match.group(0) == "}}":
        return "}"
    value = _lookup(match.group(1).strip(), context, strict)
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _lookup(reference: str, context: Mapping[str, Any], strict: bool = True) -> Any:
    parts = _split(reference)
    if parts is None:
        raise TemplateError(f"{{{reference}}} is not a reference")
    current: Any = context
    try:
        for part in parts:
            current = _child(current, part, reference)
    except TemplateError:
        if strict:
            raise
        return None
    return current


def _child(value: Any, part: str | int, reference: str) -> Any:
    if isinstance(part, int):
        if isinstance(value, list) and 0 <= part < len(value):
            return value[part]
    elif isinstance(value, Mapping) and part in value:
        return value[part]
    raise TemplateError(f"{{{reference}}}: no value at {part!r}")


def _split(reference: str) -> list[str | int] | None:
    """'steps.pay.items[0].id' -> ['steps', 'pay', 'items', 0, 'id']; None when malformed."""
    if _WHOLE.fullmatch(reference) is None:
        return None
    return [name if name else int(index) for name, index in _TOKEN.findall(reference)]
