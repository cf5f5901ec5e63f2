"""The condition language (DESIGN.md §2), parsed once, evaluated per result.

Probes and a call step's `expect:` judge an answer:

    [STATUS] == 200            [RESPONSE_TIME] < 300ms      [BODY].status == UP
    len([BODY].items) > 0      has([BODY].errors) == false  [BODY].name == pat(hms-*)
    [CONNECTED] == true        [CERTIFICATE_EXPIRATION] > 48h

A workflow step's `when:` judges the process so far (`parse_context_condition`):

    [steps.validate.priority] == urgent     [input.amount] > 1000     has([input.parent_id])

It lives in the registry, the lowest room, because a registration carries probe
conditions and workflows need the same language. A condition that cannot be parsed is
refused where it is written (a config error or a 422), never at probe or run time. When
one fails, it says what it saw: `[STATUS] == 200 (got 503)`.
"""

from __future__ import annotations

import enum
import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol

from .durations import parse_duration

MISSING: Any = object()


class ConditionError(ValueError):
    """A condition that does not parse; the message says what is wrong and where."""


class Observation(Protocol):
    """What a probe saw; monitor.probing.probe.ProbeResult is one."""

    @property
    def status(self) -> int | None: ...
    @property
    def response_time(self) -> float: ...
    @property
    def connected(self) -> bool: ...
    @property
    def certificate_expires_in(self) -> float | None: ...
    @property
    def body_text(self) -> str: ...
    def body_json(self) -> Any: ...


class Kind(enum.Enum):
    NUMBER = "number"
    DURATION = "duration"
    BOOL = "bool"
    TEXT = "text"
    ANY = "any"


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_ORDERING = {"<", "<=", ">", ">="}
_SPLIT = re.compile(r"\s*(==|!=|<=|>=|<|>)\s*")
_PLACEHOLDER = re.compile(
    r"\[(STATUS|RESPONSE_TIME|BODY|CONNECTED|CERTIFICATE_EXPIRATION)\]"
    r"((?:\.[A-Za-z0-9_\-]+|\[\d+\])*)"
)
# `[input.a.b]`, `[steps.name.field]`, `[process.id]`: the path is inside the brackets
# (DESIGN.md §2), the names the templates read (workflows/describe.py template_context).
_CONTEXT = re.compile(r"\[(input|steps|process)((?:\.[A-Za-z0-9_\-]+|\[\d+\])*)\]")
_PATH_PART = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


@dataclass(frozen=True, slots=True)
class Operand:
    """The left side: a placeholder, maybe a JSON path, maybe inside len() or has()."""

    placeholder: str  # STATUS, BODY, ...; or input, steps, process (a workflow condition)
    path: tuple[str | int, ...]
    function: str | None  # None, "len" or "has"

    @property
    def kind(self) -> Kind:
        if self.function == "len":
            return Kind.NUMBER
        if self.function == "has" or self.placeholder == "CONNECTED":
            return Kind.BOOL
        if self.placeholder in ("RESPONSE_TIME", "CERTIFICATE_EXPIRATION"):
            return Kind.DURATION
        if self.placeholder == "STATUS":
            return Kind.NUMBER
        return Kind.ANY if self.path else Kind.TEXT

    def observe(self, result: Observation) -> Any:
        return self._apply(self._raw(result))

    def observe_context(self, context: Mapping[str, Any]) -> Any:
        return self._apply(_follow(context.get(self.placeholder, MISSING), self.path))

    def _apply(self, value: Any) -> Any:
        if self.function == "has":
            return value is not MISSING
        if self.function == "len":
            if value is MISSING or value is None:
                return MISSING
            return len(value) if isinstance(value, (str, list, dict)) else len(str(value))
        return value

    def _raw(self, result: Observation) -> Any:
        if self.placeholder == "STATUS":
            return MISSING if result.status is None else result.status
        if self.placeholder == "RESPONSE_TIME":
            return result.response_time
        if self.placeholder == "CONNECTED":
            return result.connected
        if self.placeholder == "CERTIFICATE_EXPIRATION":
            expires = result.certificate_expires_in
            return MISSING if expires is None else expires
        if not self.path:
            return result.body_text
        return _follow(result.body_json(), self.path)


def _follow(value: Any, path: tuple[str | int, ...]) -> Any:
    if value is MISSING:
        return MISSING
    for part in path:
        if isinstance(part, int):
            if not isinstance(value, list) or part >= len(value):
                return MISSING
            value = value[part]
        else:
            if not isinstance(value, dict) or part not in value:
                return MISSING
            value = value[part]
    return value


@dataclass(frozen=True, slots=True)
class Condition:
    text: str
    left: Operand
    op: str
    expected: Any
    pattern: str | None  # pat(...) on the right

    def check(self, result: Observation) -> tuple[bool, str]:
        """(holds, what was observed), the latter in the condition's own units."""
        return self._judge(self.left.observe(result))

    def check_context(self, context: Mapping[str, Any]) -> tuple[bool, str]:
        """A workflow condition over `{"input", "steps", "process"}`: (holds, what was seen)."""
        return self._judge(self.left.observe_context(context))

    def _judge(self, observed: Any) -> tuple[bool, str]:
        if observed is MISSING:
            return False, "missing"
        if self.pattern is not None:
            hit = fnmatchcase(_as_text(observed), self.pattern)
            return (hit if self.op == "==" else not hit), _as_text(observed)
        try:
            holds = _OPERATORS[self.op](_coerce(observed, self.expected), self.expected)
        except TypeError:
            holds = False
        return bool(holds), _show(observed, self.left.kind)


def parse_conditions(texts: Sequence[str]) -> tuple[Condition, ...]:
    """Parse every condition; one ConditionError lists all that fail."""
    parsed: list[Condition] = []
    problems: list[str] = []
    for i, text in enumerate(texts):
        try:
            parsed.append(parse_condition(text))
        except ConditionError as exc:
            problems.append(f"conditions[{i}]: {exc}")
    if problems:
        raise ConditionError("; ".join(problems))
    return tuple(parsed)


def parse_condition(text: str) -> Condition:
    """A condition over an answer (a probe's result, a call's response)."""
    return _parse(text, context=False)


def parse_context_condition(text: str) -> Condition:
    """A condition over a process: `[input.x]`, `[steps.<name>.field]`, `[process.id]`."""
    return _parse(text, context=True)


def _parse(text: str, *, context: bool) -> Condition:
    if not isinstance(text, str):
        raise ConditionError(f"{text!r}: a condition is a string")
    parts = _SPLIT.split(text.strip(), maxsplit=1)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise ConditionError(
            f"{text!r}: expected <placeholder> <op> <value>, op one of == != < <= > >="
        )
    left_text, op, right_text = parts
    left = _parse_context_left(text, left_text) if context else _parse_left(text, left_text)
    pattern = None
    expected: Any = None
    match = re.fullmatch(r"pat\((.*)\)", right_text)
    if match:
        if op not in ("==", "!="):
            raise ConditionError(f"{text!r}: pat() works with == and != only")
        pattern = match.group(1)
    else:
        expected = _parse_value(text, right_text, left.kind)
        if op in _ORDERING and not isinstance(expected, (int, float)):
            raise ConditionError(f"{text!r}: {op} needs a number or a duration on the right")
    return Condition(text=text, left=left, op=op, expected=expected, pattern=pattern)


def _parse_left(text: str, left: str) -> Operand:
    function = None
    match = re.fullmatch(r"(len|has)\((.*)\)", left)
    if match:
        function, left = match.group(1), match.group(2).strip()
    placeholder = _PLACEHOLDER.fullmatch(left)
    if placeholder is None:
        raise ConditionError(
            f"{text!r}: unknown placeholder {left!r} (use [STATUS], [RESPONSE_TIME], [BODY], "
            "[BODY].path, [CONNECTED], [CERTIFICATE_EXPIRATION], len(...), has(...))"
        )
    name, path_text = placeholder.group(1), placeholder.group(2)
    if path_text and name != "BODY":
        raise ConditionError(f"{text!r}: only [BODY] takes a path")
    path = tuple(int(index) if index else key for key, index in _PATH_PART.findall(path_text))
    if function == "has" and name != "BODY":
        raise ConditionError(f"{text!r}: has() applies to [BODY] paths")
    return Operand(placeholder=name, path=path, function=function)


def _parse_context_left(text: str, left: str) -> Operand:
    function = None
    match = re.fullmatch(r"(len|has)\((.*)\)", left)
    if match:
        function, left = match.group(1), match.group(2).strip()
    reference = _CONTEXT.fullmatch(left)
    if reference is None:
        raise ConditionError(
            f"{text!r}: unknown reference {left!r} (use [input.<field>], "
            "[steps.<step>.<field>], [process.id], len(...), has(...))"
        )
    name, path_text = reference.group(1), reference.group(2)
    path = tuple(int(index) if index else key for key, index in _PATH_PART.findall(path_text))
    if name == "steps" and (not path or not isinstance(path[0], str)):
        raise ConditionError(f"{text!r}: name the step: [steps.<step>.<field>]")
    if name == "process" and path != ("id",):
        raise ConditionError(f"{text!r}: a process offers [process.id] only")
    return Operand(placeholder=name, path=path, function=function)


def _parse_value(text: str, raw: str, kind: Kind) -> Any:
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    if kind is Kind.DURATION:
        if _NUMBER.fullmatch(value):
            return float(value) / 1000  # a bare number is milliseconds, as in Gatus
        try:
            return parse_duration(value).total_seconds()
        except ValueError:
            raise ConditionError(f"{text!r}: {value!r} is not a duration such as 300ms") from None
    if kind is Kind.BOOL or value in ("true", "false"):
        if value not in ("true", "false"):
            raise ConditionError(f"{text!r}: expected true or false, got {value!r}")
        return value == "true"
    if _NUMBER.fullmatch(value):
        return float(value) if "." in value else int(value)
    if kind is Kind.NUMBER:
        raise ConditionError(f"{text!r}: expected a number, got {value!r}")
    return value


def _coerce(observed: Any, expected: Any) -> Any:
    """Compare like with like: a JSON "200" against 200, a number against "UP" as text."""
    if isinstance(expected, bool) or isinstance(observed, bool):
        return observed
    if isinstance(expected, (int, float)) and isinstance(observed, str):
        try:
            return float(observed)
        except ValueError:
            return observed
    if isinstance(expected, str) and not isinstance(observed, str):
        return _as_text(observed)
    return observed


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _show(value: Any, kind: Kind) -> str:
    if kind is Kind.DURATION and isinstance(value, (int, float)):
        return f"{value * 1000:.0f}ms" if abs(value) < 60 else f"{value / 3600:.1f}h"
    text = _as_text(value)
    return text if len(text) <= 80 else text[:77] + "..."
