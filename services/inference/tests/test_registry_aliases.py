"""The adapter registry and the alias store on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from flywheel.contracts.common.v1.common_pb2 import AdapterRef, ArtifactRef, FileDigest
from flywheel.contracts.inference.v1 import events_pb2 as ie
from flywheel.contracts.inference.v1 import resources_pb2 as ri
from flywheel.contracts.trainer.v1 import resources_pb2 as tr
from flywheel.core.db import SessionFactory, create_engine, session_factory
from flywheel.core.errors import Conflict, InvalidArgument, NotFound
from flywheel.core.events.envelope import parse, unpack
from flywheel.core.events.outbox import OutboxEvent
from flywheel.core.migrations import upgrade
from flywheel.inference.aliases import AliasStore, to_proto
from flywheel.inference.models import MIGRATIONS, AliasRevisionRow
from flywheel.inference.registry import AdapterRegistry
from flywheel.inference.routing import Arm, WeightedRef

ROUTABLE = ri.ADAPTER_STATUS_ROUTABLE
REJECTED = ri.ADAPTER_STATUS_REJECTED


@dataclass
class Stores:
    sessions: SessionFactory
    registry: AdapterRegistry
    aliases: AliasStore
    wakes: list[str]


@pytest.fixture(params=["sqlite", "postgres"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    url, schema = f"sqlite+aiosqlite:///{tmp_path / 'i.sqlite3'}", None
    if request.param == "postgres":
        url, schema = request.getfixturevalue("pg_url"), "inference"
    engine = create_engine(url, schema=schema)
    try:
        await upgrade(engine, schema, [MIGRATIONS])
        sessions = session_factory(engine)
        wakes: list[str] = []
        yield Stores(
            sessions,
            AdapterRegistry(sessions, on_commit=lambda: wakes.append("registry")),
            AliasStore(sessions, on_commit=lambda: wakes.append("aliases")),
            wakes,
        )
    finally:
        await engine.dispose()


def manifest(name: str, version: str, sha: str = "a", **metrics: float) -> tr.AdapterManifest:
    return tr.AdapterManifest(
        adapter=AdapterRef(name=name, version=version),
        task="budgeting",
        artifact=ArtifactRef(uri=f"file:///a/{name}/{version}", sha256=sha * 64),
        files=[FileDigest(path="adapter_model.safetensors", sha256=sha * 64, size_bytes=10)],
        metrics=metrics,
    )


async def events(sessions: SessionFactory) -> list[tuple[str, str, object]]:
    """Every staged event as (type, tenant, payload), oldest first."""
    async with sessions() as session:
        rows = (await session.scalars(select(OutboxEvent).order_by(OutboxEvent.id))).all()
    out: list[tuple[str, str, object]] = []
    for row in rows:
        envelope = parse(row.value)
        kind = {"adapter.rejected": ie.AdapterRejected, "adapter.promoted": ie.AdapterPromoted}
        out.append((envelope.type, envelope.tenant, unpack(envelope, kind[envelope.type])))
    return out


async def registered(s: Stores, tenant: str, *versions: str, name: str = "budget") -> None:
    for version in versions:
        await s.registry.register(tenant, manifest(name, version))
        await s.registry.set_status(tenant, name, version, ROUTABLE)


def one(name: str, version: str, label: str = "main") -> Arm:
    return Arm(label, 1.0, (WeightedRef(name, version),))


# --- registry -------------------------------------------------------------------------


async def test_register_is_idempotent_and_versions_are_immutable(stores: Stores) -> None:
    first, created = await stores.registry.register("acme", manifest("budget", "v1"))
    assert created
    assert first.status == ri.ADAPTER_STATUS_REGISTERED
    assert first.manifest.tenant_id == "acme"
    # Same weights, other metrics and URI: the same version, not a new entry.
    again, created = await stores.registry.register("acme", manifest("budget", "v1", loss=0.5))
    assert not created
    assert again.manifest == first.manifest
    with pytest.raises(Conflict, match="immutable"):
        await stores.registry.register("acme", manifest("budget", "v1", sha="b"))
    # Another tenant may hold a version of the same name with other content.
    _, created = await stores.registry.register("globex", manifest("budget", "v1", sha="b"))
    assert created


async def test_register_refuses_bad_manifests(stores: Stores) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await stores.registry.register("acme", manifest("bad/name", ""))
    fields = {e.field for e in caught.value.errors}
    assert fields == {"manifest.adapter.name", "manifest.adapter.version"}
    other = manifest("budget", "v1")
    other.tenant_id = "globex"
    with pytest.raises(InvalidArgument, match="tenant_id"):
        await stores.registry.register("acme", other)


async def test_composite_components_are_kept_and_compared(stores: Stores) -> None:
    parts = (WeightedRef("brand", "v1", 0.5), WeightedRef("task", "v2", 1.5))
    entry, _ = await stores.registry.register("acme", manifest("mix", "v1"), parts)
    assert [(c.adapter.name, c.weight) for c in entry.components] == [("brand", 0.5), ("task", 1.5)]
    _, created = await stores.registry.register("acme", manifest("mix", "v1"), parts)
    assert not created
    with pytest.raises(Conflict):
        await stores.registry.register("acme", manifest("mix", "v1"), parts[:1])


async def test_status_changes_and_rejection_event(stores: Stores) -> None:
    await stores.registry.register("acme", manifest("budget", "v1"))
    entry = await stores.registry.set_status("acme", "budget", "v1", ri.ADAPTER_STATUS_VALIDATING)
    assert entry.status == ri.ADAPTER_STATUS_VALIDATING
    assert await events(stores.sessions) == []
    with pytest.raises(InvalidArgument):
        await stores.registry.set_status("acme", "budget", "v1", REJECTED)  # no code
    entry = await stores.registry.set_status(
        "acme", "budget", "v1", REJECTED, reject_code="sha256_mismatch", reject_reason="file x"
    )
    assert (entry.status, entry.reject_reason) == (REJECTED, "file x")
    # Rejected again (a retry): no second event; and it never comes back.
    await stores.registry.set_status("acme", "budget", "v1", REJECTED, reject_code="load_failed")
    with pytest.raises(Conflict):
        await stores.registry.set_status("acme", "budget", "v1", ROUTABLE)
    staged = await events(stores.sessions)
    assert len(staged) == 1
    kind, tenant, payload = staged[0]
    assert (kind, tenant) == ("adapter.rejected", "acme")
    assert payload == ie.AdapterRejected(
        tenant_id="acme", adapter=AdapterRef(name="budget", version="v1"),
        reason_code="sha256_mismatch", reason="file x",
    )  # fmt: skip
    assert stores.wakes == ["registry"]
    with pytest.raises(NotFound):
        await stores.registry.set_status("globex", "budget", "v1", ROUTABLE)


async def test_routable_mark_used_and_get(stores: Stores) -> None:
    await registered(stores, "acme", "v1", "v2")
    await registered(stores, "globex", "v1")
    await stores.registry.register("acme", manifest("budget", "v3"))
    everyone = await stores.registry.routable()
    assert [(a.manifest.tenant_id, a.manifest.adapter.version) for a in everyone] == [
        ("acme", "v1"), ("acme", "v2"), ("globex", "v1"),
    ]  # fmt: skip
    assert len(await stores.registry.routable("globex")) == 1
    assert not (await stores.registry.get("acme", "budget", "v1")).HasField("last_used_at")
    await stores.registry.mark_used("acme", "budget", "v1")
    assert (await stores.registry.get("acme", "budget", "v1")).HasField("last_used_at")
    with pytest.raises(NotFound):
        await stores.registry.mark_used("acme", "budget", "v9")
    with pytest.raises(NotFound):
        await stores.registry.get("initech", "budget", "v1")


async def test_list_adapters_pages_by_status(stores: Stores) -> None:
    await registered(stores, "acme", *(f"v{i}" for i in range(5)))
    for i in range(5, 8):
        await stores.registry.register("acme", manifest("budget", f"v{i}"))
    await registered(stores, "globex", "v0")
    seen: list[str] = []
    cursor = ""
    while True:
        page = await stores.registry.list("acme", statuses=[ROUTABLE], page_size=2, cursor=cursor)
        assert len(page.items) <= 2
        seen += [a.manifest.adapter.version for a in page.items]
        if not (cursor := page.next_cursor):
            break
    assert sorted(seen) == [f"v{i}" for i in range(5)]
    everything = await stores.registry.list("acme")
    assert len(everything.items) == 8
    assert everything.next_cursor == ""


# --- aliases --------------------------------------------------------------------------


async def test_set_alias_creates_then_replaces(stores: Stores) -> None:
    await registered(stores, "acme", "v1", "v2")
    state = await stores.aliases.set_alias("acme", "budgeting", one("budget", "v1"))
    assert (state.revision, state.arms) == (1, (one("budget", "v1"),))
    state = await stores.aliases.set_alias("acme", "budgeting", one("budget", "v2"), sticky=True)
    assert (state.revision, state.sticky) == (2, True)
    assert await stores.aliases.get("acme", "budgeting") == state
    message = to_proto(state)
    assert (message.name, message.tenant_id, message.revision) == ("acme/budgeting", "acme", 2)
    assert message.arms[0].adapters[0].adapter.version == "v2"
    # The base model (no adapters) is a target too.
    base = await stores.aliases.set_alias("acme", "plain", Arm("base", 1.0))
    assert base.arms[0].adapters == ()
    # set_alias and set_split announce nothing.
    assert await events(stores.sessions) == []


async def test_set_split_and_lost_update_refusal(stores: Stores) -> None:
    await registered(stores, "acme", "v1", "v2")
    arms = [one("budget", "v1", "control"), Arm("candidate", 0.1, (WeightedRef("budget", "v2"),))]
    state = await stores.aliases.set_split("acme", "ab", arms, sticky=True, expected_revision=0)
    assert state.revision == 1
    assert [a.label for a in state.arms] == ["control", "candidate"]
    state = await stores.aliases.set_split("acme", "ab", arms[::-1], expected_revision=1)
    assert state.revision == 2
    with pytest.raises(Conflict, match="revision 2, not 1"):
        await stores.aliases.set_split("acme", "ab", arms, expected_revision=1)
    assert (await stores.aliases.get("acme", "ab")).revision == 2
    with pytest.raises(InvalidArgument):
        await stores.aliases.set_split("acme", "ab", [])
    with pytest.raises(InvalidArgument):
        await stores.aliases.set_split("acme", "Bad Name", arms)


async def test_unknown_or_rejected_adapters_are_refused(stores: Stores) -> None:
    await registered(stores, "acme", "v1")
    await stores.registry.register("acme", manifest("budget", "v2"))
    await stores.registry.set_status("acme", "budget", "v2", REJECTED, reject_code="rank_too_high")
    with pytest.raises(NotFound, match="budget@v9"):
        await stores.aliases.set_alias("acme", "budgeting", one("budget", "v9"))
    with pytest.raises(Conflict, match="rejected"):
        await stores.aliases.set_split(
            "acme", "budgeting", [one("budget", "v1"), one("budget", "v2", "b")]
        )
    with pytest.raises(NotFound):
        await stores.aliases.get("acme", "budgeting")  # nothing was created
    await stores.aliases.set_alias("acme", "budgeting", one("budget", "v1"))
    with pytest.raises(Conflict):
        await stores.aliases.promote("acme", "budgeting", AdapterRef(name="budget", version="v2"))
    with pytest.raises(NotFound):
        await stores.aliases.promote("acme", "budgeting", AdapterRef(name="budget", version="v3"))
    assert (await stores.aliases.get("acme", "budgeting")).revision == 1


async def test_promote_then_rollback(stores: Stores) -> None:
    await registered(stores, "acme", "v1", "v2")
    split = [one("budget", "v1", "control"), Arm("candidate", 0.1, (WeightedRef("budget", "v2"),))]
    await stores.aliases.set_split("acme", "ab", split, sticky=True)
    promoted = await stores.aliases.promote(
        "acme", "ab", AdapterRef(name="budget", version="v2"), reason="won A/B"
    )
    # The candidate's label survives, so logs stay continuous.
    assert promoted.arms == (Arm("candidate", 1.0, (WeightedRef("budget", "v2"),)),)
    assert (promoted.revision, promoted.sticky) == (2, True)
    back = await stores.aliases.rollback("acme", "ab", reason="regression")
    assert (back.revision, back.arms, back.sticky) == (3, tuple(split), True)
    # Rolling back again returns to the promoted arms, as yet another revision.
    again = await stores.aliases.rollback("acme", "ab")
    assert (again.revision, again.arms) == (4, promoted.arms)

    staged = await events(stores.sessions)
    assert [(k, t) for k, t, _ in staged] == [("adapter.promoted", "acme")] * 3
    first, second, third = (p for _, _, p in staged)
    assert isinstance(first, ie.AdapterPromoted)
    assert isinstance(second, ie.AdapterPromoted)
    assert isinstance(third, ie.AdapterPromoted)
    assert (first.alias, first.alias_revision, first.reason, first.rollback) == (
        "ab",
        2,
        "won A/B",
        False,
    )
    assert first.adapter == AdapterRef(name="budget", version="v2")
    assert [a.label for a in first.previous_arms] == ["control", "candidate"]
    # Back to a split: no single adapter gets everything, so none is named.
    assert (second.alias_revision, second.rollback, second.HasField("adapter")) == (3, True, False)
    assert [a.label for a in second.previous_arms] == ["candidate"]
    assert (third.alias_revision, third.adapter.version) == (4, "v2")
    assert stores.wakes.count("aliases") == 3


async def test_rollback_needs_an_earlier_revision(stores: Stores) -> None:
    await registered(stores, "acme", "v1", "v2")
    await stores.aliases.set_alias("acme", "budgeting", one("budget", "v1"))
    with pytest.raises(Conflict, match="no earlier revision"):
        await stores.aliases.rollback("acme", "budgeting")
    with pytest.raises(NotFound):
        await stores.aliases.rollback("acme", "nothing")
    with pytest.raises(NotFound):
        await stores.aliases.promote("acme", "nothing", AdapterRef(name="budget", version="v1"))


async def test_delete_keeps_numbering_and_history(stores: Stores) -> None:
    await registered(stores, "acme", "v1", "v2")
    await stores.aliases.set_alias("acme", "budgeting", one("budget", "v1"))
    await stores.aliases.set_alias("acme", "budgeting", one("budget", "v2"))
    await stores.aliases.delete("acme", "budgeting", reason="retired")
    with pytest.raises(NotFound):
        await stores.aliases.get("acme", "budgeting")
    with pytest.raises(NotFound):
        await stores.aliases.delete("acme", "budgeting")
    again = await stores.aliases.set_alias("acme", "budgeting", one("budget", "v1"))
    assert again.revision == 4  # 1, 2, deletion 3, then 4
    # The deleted alias's past is not the new one's.
    with pytest.raises(Conflict):
        await stores.aliases.rollback("acme", "budgeting")
    async with stores.sessions() as session:
        history = (
            await session.scalars(select(AliasRevisionRow).order_by(AliasRevisionRow.revision))
        ).all()
    assert [(h.revision, bool(h.arms), h.reason) for h in history] == [
        (1, True, ""), (2, True, ""), (3, False, "retired"), (4, True, ""),
    ]  # fmt: skip


async def test_apply_promoted_event_from_others(stores: Stores) -> None:
    await registered(stores, "acme", "v1", "v2")
    await stores.aliases.set_alias("acme", "budgeting", one("budget", "v1"))

    def promoted(
        revision: int, version: str = "v2", alias: str = "budgeting"
    ) -> ie.AdapterPromoted:
        return ie.AdapterPromoted(
            tenant_id="acme", alias=alias, alias_revision=revision, reason="policy",
            adapter=AdapterRef(name="budget", version=version),
        )  # fmt: skip

    assert not await stores.aliases.apply_promoted_event(promoted(1))  # not newer
    assert await stores.aliases.apply_promoted_event(promoted(5, alias="acme/budgeting"))
    state = await stores.aliases.get("acme", "budgeting")
    assert (state.revision, state.arms) == (
        5,
        (Arm("promoted", 1.0, (WeightedRef("budget", "v2"),)),),
    )
    assert not await stores.aliases.apply_promoted_event(promoted(5, "v1"))  # redelivered
    assert not await stores.aliases.apply_promoted_event(promoted(6, "v9"))  # unknown version
    no_adapter = promoted(7)
    no_adapter.ClearField("adapter")
    assert not await stores.aliases.apply_promoted_event(no_adapter)
    # An alias this store has not seen is created at the publisher's revision.
    assert await stores.aliases.apply_promoted_event(promoted(3, alias="fresh"))
    assert (await stores.aliases.get("acme", "fresh")).revision == 3
    assert (await stores.aliases.get("acme", "budgeting")).revision == 5
    # Applying republishes nothing (the publisher's event is already out).
    assert await events(stores.sessions) == []


async def test_tenants_are_isolated(stores: Stores) -> None:
    await registered(stores, "acme", "v1")
    await registered(stores, "globex", "v2")
    await stores.aliases.set_alias("acme", "budgeting", one("budget", "v1"))
    # globex cannot route to acme's version, nor see or change acme's alias.
    with pytest.raises(NotFound):
        await stores.aliases.set_alias("globex", "budgeting", one("budget", "v1"))
    with pytest.raises(NotFound):
        await stores.aliases.get("globex", "budgeting")
    with pytest.raises(NotFound):
        await stores.aliases.promote("globex", "budgeting", AdapterRef(name="budget", version="v2"))
    state = await stores.aliases.set_alias("globex", "budgeting", one("budget", "v2"))
    assert state.revision == 1  # numbering is per tenant too
    assert (await stores.aliases.get("acme", "budgeting")).arms == (one("budget", "v1"),)
    assert [a.name for a in (await stores.aliases.list("globex")).items] == ["budgeting"]


async def test_list_aliases_pages(stores: Stores) -> None:
    await registered(stores, "acme", "v1")
    names = [f"alias-{i}" for i in range(7)]
    for name in names:
        await stores.aliases.set_alias("acme", name, one("budget", "v1"))
    await stores.aliases.set_alias("acme", "alias-0", one("budget", "v1"))  # changes keep order
    seen: list[str] = []
    cursor = ""
    while True:
        page = await stores.aliases.list("acme", page_size=3, cursor=cursor)
        seen += [a.name for a in page.items]
        if not (cursor := page.next_cursor):
            break
    assert sorted(seen) == names
    assert len(seen) == len(names)
    assert (await stores.aliases.list("globex")).items == []


async def test_concurrent_first_writes_of_one_alias(stores: Stores) -> None:
    await registered(stores, "acme", "v1", "v2")
    results = await asyncio.gather(
        *(
            stores.aliases.set_alias("acme", "race", one("budget", f"v{1 + i % 2}"))
            for i in range(6)
        )
    )
    assert sorted(r.revision for r in results) == [1, 2, 3, 4, 5, 6]
    assert (await stores.aliases.get("acme", "race")).revision == 6
