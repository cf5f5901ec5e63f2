"""An instance's JSON form: the same whichever of its parts are shared with the fleet."""

from __future__ import annotations

import pytest

from registry import ProbeSpec
from registry import model as registry_model
from registry.model import Instance


def instance(n: int, *, path: str = "/health", updated: float = 1_700_000_000.5) -> Instance:
    return Instance(
        service="payments",
        id=f"i-{n}",
        url=f"http://127.0.0.1:{8000 + n}",
        probe=ProbeSpec(path=path),
        ttl=30.0,
        registered_at=1_700_000_000.5,
        updated_at=updated,
    )


def test_a_new_registration_shows_one_time_twice_and_its_probe() -> None:
    document = instance(1).document
    assert document["registered_at"] == document["updated_at"] == "2023-11-14T22:13:20.500Z"
    assert document["probe"] == {"path": "/health"}
    assert document["ttl"] == "30s"


def test_an_updated_instance_shows_both_times() -> None:
    document = instance(2, updated=1_700_000_060.25).document
    assert document["registered_at"] == "2023-11-14T22:13:20.500Z"
    assert document["updated_at"] == "2023-11-14T22:14:20.250Z"


def test_the_probe_shows_after_the_fleet_table_of_probes_was_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More distinct probe settings than are shared clears the shared table: instances
    registered before still show their own probe, read before the clear or after."""
    monkeypatch.setattr(registry_model, "MAX_SHARED_PROBES", 4)
    read_before, unread = instance(3, path="/a"), instance(4, path="/b")
    assert read_before.document["probe"] == {"path": "/a"}
    for n in range(10):  # each new setting: the table is cleared once it holds four
        instance(10 + n, path=f"/other-{n}")
    assert read_before.document["probe"] == {"path": "/a"}
    assert unread.document["probe"] == {"path": "/b"}
    assert unread.document["probe"] == {"path": "/b"}  # read twice: kept or rebuilt alike


def test_a_probe_no_longer_shared_is_serialised_once_not_on_every_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read while its probe was shared (the 201 answer), then the table is cleared: the
    instance keeps its own probe JSON, not a model_dump per read (10,000 instances
    listed took 126-167 ms of the loop that way, against 26-30)."""
    monkeypatch.setattr(registry_model, "MAX_SHARED_PROBES", 4)
    listed = instance(5, path="/a")
    assert listed.document["probe"] == {"path": "/a"}
    for n in range(10):
        instance(30 + n, path=f"/again-{n}")
    dumps: list[object] = []
    dump = ProbeSpec.model_dump

    def counted(self: ProbeSpec, *args: object, **kwargs: object) -> dict[str, object]:
        dumps.append(self)
        return dump(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ProbeSpec, "model_dump", counted)
    for _ in range(5):
        assert listed.document["probe"] == {"path": "/a"}
    assert len(dumps) <= 1
