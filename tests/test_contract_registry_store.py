"""The RegistryStore contract (registry.abc), run against every implementation through the
Protocol alone: what is saved loads back, the index only rises, a broken storage refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry import Instance, ProbeSpec, RegistryStore, SqliteRegistryStore, StoreUnavailable
from registry.stores.postgres import PgRegistryStore

from .contracts import Factory, factory_for, postgres_factory, sqlite_factory

FACTORIES: dict[str, Factory[RegistryStore]] = {
    "sqlite": sqlite_factory(SqliteRegistryStore),
    "postgres": postgres_factory(PgRegistryStore),
}


@pytest.fixture
def factory(backend: str) -> Factory[RegistryStore]:
    return factory_for(FACTORIES, backend)


def instance(service: str = "pay", id: str = "p1", **fields: object) -> Instance:
    defaults: dict[str, object] = {
        "url": f"http://10.0.0.1:8080/{id}",
        "registered_at": 1_800_000_000.5,
        "updated_at": 1_800_000_001.25,
    }
    return Instance(service=service, id=id, **{**defaults, **fields})  # type: ignore[arg-type]


FULL = instance(
    tags=("blue", "eu"),
    meta={"zone": "a", "version": "1.2.3"},
    probe=ProbeSpec.model_validate({"type": "tcp", "interval": "5s", "failure_threshold": 2}),
    ttl=30.0,
    deregister_after=120.0,
)


async def test_a_fresh_store_loads_nothing_and_index_zero(
    factory: Factory[RegistryStore], tmp_path: Path
) -> None:
    async with factory(tmp_path) as backing:
        assert await backing.store.load() == ([], 0)


async def test_load_is_idempotent(factory: Factory[RegistryStore], tmp_path: Path) -> None:
    async with factory(tmp_path) as backing:
        await backing.store.load()
        await backing.store.save(FULL, 1)
        assert await backing.store.load() == await backing.store.load() == ([FULL], 1)


async def test_a_saved_instance_loads_back_field_for_field(
    factory: Factory[RegistryStore], tmp_path: Path
) -> None:
    async with factory(tmp_path) as backing:
        await backing.store.load()
        await backing.store.save(FULL, 7)
        await backing.store.save(instance(id="p2"), 8)
        loaded, index = await backing.store.load()
    assert index == 8
    by_key = {item.key: item for item in loaded}
    assert by_key == {FULL.key: FULL, ("pay", "p2"): instance(id="p2")}
    assert by_key[FULL.key].document == FULL.document


async def test_save_replaces_the_instance_with_the_same_key(
    factory: Factory[RegistryStore], tmp_path: Path
) -> None:
    changed = instance(url="http://10.0.0.2:9090/", tags=("green",), ttl=None)
    async with factory(tmp_path) as backing:
        await backing.store.load()
        await backing.store.save(FULL, 1)
        await backing.store.save(changed, 2)
        assert await backing.store.load() == ([changed], 2)


async def test_delete_removes_one_instance_and_raises_the_index(
    factory: Factory[RegistryStore], tmp_path: Path
) -> None:
    other = instance(service="ship", id="p1")
    async with factory(tmp_path) as backing:
        await backing.store.load()
        await backing.store.save(FULL, 1)
        await backing.store.save(other, 2)
        await backing.store.delete("pay", "p1", 3)
        await backing.store.delete("pay", "never-stored", 4)
        assert await backing.store.load() == ([other], 4)


async def test_the_index_never_goes_down(factory: Factory[RegistryStore], tmp_path: Path) -> None:
    async with factory(tmp_path) as backing:
        await backing.store.load()
        await backing.store.save(FULL, 9)
        await backing.store.delete("pay", "p2", 4)
        assert (await backing.store.load())[1] == 9


async def test_a_reopened_store_reads_back_what_was_written(
    factory: Factory[RegistryStore], tmp_path: Path
) -> None:
    async with factory(tmp_path) as backing:
        await backing.store.load()
        await backing.store.save(FULL, 1)
        await backing.store.save(instance(id="gone"), 2)
        await backing.store.delete("pay", "gone", 3)
    async with factory(tmp_path) as backing:
        assert await backing.store.load() == ([FULL], 3)


async def test_writes_to_a_broken_storage_raise_store_unavailable(
    factory: Factory[RegistryStore], tmp_path: Path
) -> None:
    async with factory(tmp_path) as backing:
        await backing.store.load()
        await backing.break_storage()
        with pytest.raises(StoreUnavailable):
            await backing.store.save(FULL, 1)
        with pytest.raises(StoreUnavailable):
            await backing.store.delete("pay", "p1", 2)
