"""What an event is about, the state it reports and its one-line summary: shared by
the rate limit and every body format."""

from __future__ import annotations

import hashlib

import orjson

from scheduler import Event


def subject_of(event: Event) -> str:
    """What an event is about: one notification per subject and state, not per event."""
    data = event.data
    if "instance" in data:
        return f"{data.get('service')}/{data['instance']}"
    if "slo" in data:
        return f"{data.get('service')}/{data['slo']}"
    for key in ("process", "service", "subject"):
        if key in data:
            return str(data[key])
    return ""


def fingerprint_of(event: Event) -> str:
    """The state an event reports; the same state twice is not news."""
    data = event.data
    if event.topic == "health.changed":
        return str(data.get("to"))
    if event.topic == "slo.burn":
        return str(data.get("severity"))
    return hashlib.blake2b(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def summary_of(event: Event) -> str:
    data = event.data
    if event.topic == "health.changed":
        reason = f": {data['reason']}" if data.get("reason") else ""
        return (
            f"{data.get('service')}/{data.get('instance')} is {data.get('to')} "
            f"(was {data.get('from')}){reason}"
        )
    if event.topic == "slo.burn":
        windows = "/".join(data.get("windows", []))
        return (
            f"SLO {data.get('service')}/{data.get('slo')} burning its error budget "
            f"{data.get('burn_rate', 0):.1f}x over {windows} ({data.get('severity')})"
        )
    if event.topic.startswith("workflow."):
        error = f": {data['error']}" if data.get("error") else ""
        return (
            f"{data.get('workflow')} process {data.get('process')} "
            f"{event.topic.removeprefix('workflow.')}{error}"
        )
    return f"{event.topic} {subject_of(event)}".strip()
