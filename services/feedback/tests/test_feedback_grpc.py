"""The feedback service end to end over gRPC: records, scoping, validation, events."""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
import pytest

from flywheel.contracts.common.v1.common_pb2 import (
    AdapterRef,
    ChatMessage,
    ChatMessages,
    PageRequest,
    Prompt,
)
from flywheel.contracts.feedback.v1 import resources_pb2 as pb
from flywheel.contracts.feedback.v1 import service_pb2 as api
from flywheel.contracts.feedback.v1.events_pb2 import FeedbackEdited, FeedbackRecorded
from flywheel.contracts.feedback.v1.service_pb2_grpc import FeedbackServiceStub
from flywheel.core.errors import field_errors_of
from flywheel.core.events.envelope import parse, unpack
from flywheel.core.ids import generation_id_for
from flywheel.core.runtime import ServiceRuntime


async def _tenant(stub: FeedbackServiceStub, tenant: str) -> None:
    await stub.CreateTenant(api.CreateTenantRequest(tenant_id=tenant, display_name=tenant.title()))


async def _generation(
    stub: FeedbackServiceStub, tenant: str, prompt: str = "Plan Q3 budget", **extra: Any
) -> pb.Generation:
    response = await stub.LogGeneration(
        api.LogGenerationRequest(
            tenant_id=tenant,
            generation=api.GenerationInput(
                task="budgeting",
                prompt=Prompt(text=prompt),
                output="Put 60% on search.",
                model="acme/budgeting",
                adapter=AdapterRef(name="acme-budget", version="v3"),
                **extra,
            ),
        )
    )
    generation: pb.Generation = response.generation
    return generation


async def _error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_keys_authenticate_until_revoked(stub: FeedbackServiceStub) -> None:
    await _tenant(stub, "acme")
    created = await stub.CreateApiKey(
        api.CreateApiKeyRequest(tenant_id="acme", role=pb.ROLE_RATER, name="rater ui")
    )
    assert created.secret.startswith("fw_")
    auth = await stub.AuthenticateApiKey(api.AuthenticateApiKeyRequest(secret=created.secret))
    assert (auth.api_key.tenant_id, auth.api_key.role) == ("acme", pb.ROLE_RATER)
    listed = await stub.ListApiKeys(api.ListApiKeysRequest(tenant_id="acme"))
    assert [k.key_id for k in listed.api_keys] == [created.api_key.key_id]
    assert "secret" not in str(listed)

    await stub.RevokeApiKey(
        api.RevokeApiKeyRequest(tenant_id="acme", key_id=created.api_key.key_id)
    )
    error = await _error(
        stub.AuthenticateApiKey(api.AuthenticateApiKeyRequest(secret=created.secret))
    )
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    wrong = await _error(stub.AuthenticateApiKey(api.AuthenticateApiKeyRequest(secret="fw_nope")))
    assert wrong.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_duplicate_tenant_and_bad_slug(stub: FeedbackServiceStub) -> None:
    await _tenant(stub, "acme")
    dup = await _error(stub.CreateTenant(api.CreateTenantRequest(tenant_id="acme")))
    assert dup.code() is grpc.StatusCode.ALREADY_EXISTS
    bad = await _error(stub.CreateTenant(api.CreateTenantRequest(tenant_id="Not A Slug")))
    assert bad.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert [e.field for e in field_errors_of(bad)] == ["tenant_id"]


async def test_generations_are_idempotent_paged_and_scoped(stub: FeedbackServiceStub) -> None:
    await _tenant(stub, "acme")
    await _tenant(stub, "globex")
    first = await _generation(stub, "acme", client_generation_id="req-1")
    again = await _generation(stub, "acme", client_generation_id="req-1")
    assert again.generation_id == first.generation_id
    for i in range(4):
        await _generation(stub, "acme", prompt=f"prompt {i}")

    seen: list[str] = []
    cursor = ""
    while True:
        page = await stub.ListGenerations(
            api.ListGenerationsRequest(
                tenant_id="acme", page=PageRequest(page_size=2, cursor=cursor)
            )
        )
        seen += [g.generation_id for g in page.generations]
        cursor = page.page.next_cursor
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 5

    # Another tenant's id is simply not there.
    other = await _error(
        stub.GetGeneration(
            api.GetGenerationRequest(tenant_id="globex", generation_id=first.generation_id)
        )
    )
    assert other.code() is grpc.StatusCode.NOT_FOUND
    empty = await stub.ListGenerations(api.ListGenerationsRequest(tenant_id="globex"))
    assert list(empty.generations) == []


async def test_client_generation_id_determines_generation_id(stub: FeedbackServiceStub) -> None:
    """A caller that chose the client id knows the generation id before logging it."""
    await _tenant(stub, "acme")
    await _tenant(stub, "globex")
    single = await _generation(stub, "acme", client_generation_id="req-7")
    assert single.generation_id == generation_id_for("acme", "req-7")
    batch = await stub.BatchLogGenerations(
        api.BatchLogGenerationsRequest(
            tenant_id="globex",
            generations=[
                api.GenerationInput(
                    client_generation_id=cid,
                    task="budgeting",
                    prompt=Prompt(text="Plan Q3 budget"),
                    output="Put 60% on search.",
                    model="globex/budgeting",
                )
                for cid in ("req-7", "req-8")
            ],
        )
    )
    ids = [r.generation.generation_id for r in batch.results]
    # Same client id, other tenant: another generation, another id.
    assert ids == [generation_id_for("globex", "req-7"), generation_id_for("globex", "req-8")]
    assert ids[0] != single.generation_id
    fetched = await stub.GetGeneration(
        api.GetGenerationRequest(tenant_id="acme", generation_id=generation_id_for("acme", "req-7"))
    )
    assert fetched.generation.client_generation_id == "req-7"
    # Without a client id the id is random, as before.
    anonymous = await _generation(stub, "acme")
    assert uuid.UUID(anonymous.generation_id).version == 4


async def test_invalid_generation_names_every_field(stub: FeedbackServiceStub) -> None:
    await _tenant(stub, "acme")
    error = await _error(
        stub.LogGeneration(
            api.LogGenerationRequest(
                tenant_id="acme",
                generation=api.GenerationInput(
                    task="Bad Task",
                    prompt=Prompt(
                        messages=ChatMessages(messages=[ChatMessage(role="wizard", content="x")])
                    ),
                ),
            )
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert {e.field for e in field_errors_of(error)} == {
        "generation.task",
        "generation.prompt.messages[0].role",
        "generation.model",
    }


async def test_every_feedback_kind_and_its_rules(stub: FeedbackServiceStub) -> None:
    await _tenant(stub, "acme")
    a = await _generation(stub, "acme")
    b = await _generation(stub, "acme")
    other_prompt = await _generation(stub, "acme", prompt="something else")
    values = [
        pb.FeedbackValue(thumbs=pb.THUMB_DOWN),
        pb.FeedbackValue(rating=pb.Rating(value=4)),
        pb.FeedbackValue(comment=pb.Comment(text="too much display")),
        pb.FeedbackValue(
            preference=pb.Preference(
                generation_b_id=b.generation_id, choice=pb.PREFERENCE_CHOICE_B, strength=0.8
            )
        ),
        pb.FeedbackValue(correction=pb.Correction(output="Put 70% on search.")),
    ]
    for value in values:
        response = await stub.RecordFeedback(
            api.RecordFeedbackRequest(tenant_id="acme", generation_id=a.generation_id, value=value)
        )
        assert response.created
        assert response.feedback.value == value
        assert response.feedback.adapter.name == "acme-budget"
        assert response.feedback.source.kind == pb.SOURCE_KIND_HUMAN

    async def invalid(value: pb.FeedbackValue, **kw: Any) -> list[str]:
        error = await _error(
            stub.RecordFeedback(
                api.RecordFeedbackRequest(
                    tenant_id="acme", generation_id=a.generation_id, value=value, **kw
                )
            )
        )
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        return [e.field for e in field_errors_of(error)]

    assert await invalid(pb.FeedbackValue(rating=pb.Rating(value=6))) == ["value.rating.value"]
    assert await invalid(pb.FeedbackValue()) == ["value"]
    assert await invalid(pb.FeedbackValue(comment=pb.Comment(text="x" * 10_001))) == [
        "value.comment.text"
    ]
    assert await invalid(
        pb.FeedbackValue(
            preference=pb.Preference(
                generation_b_id=other_prompt.generation_id, choice=pb.PREFERENCE_CHOICE_A
            )
        )
    ) == ["value.preference.generation_b_id"]
    assert await invalid(
        pb.FeedbackValue(thumbs=pb.THUMB_UP),
        source=pb.FeedbackSource(kind=pb.SOURCE_KIND_SYNTHETIC),
    ) == ["source.critic"]

    missing = await _error(
        stub.RecordFeedback(
            api.RecordFeedbackRequest(
                tenant_id="acme", generation_id="nope", value=pb.FeedbackValue(thumbs=pb.THUMB_UP)
            )
        )
    )
    assert missing.code() is grpc.StatusCode.NOT_FOUND


async def test_edit_and_retract_are_revisions_and_events(
    stub: FeedbackServiceStub, feedback_runtime: ServiceRuntime
) -> None:
    await _tenant(stub, "acme")
    generation = await _generation(stub, "acme")
    recorded = await stub.RecordFeedback(
        api.RecordFeedbackRequest(
            tenant_id="acme",
            generation_id=generation.generation_id,
            value=pb.FeedbackValue(rating=pb.Rating(value=2)),
            client_feedback_id="fb-1",
        )
    )
    retried = await stub.RecordFeedback(
        api.RecordFeedbackRequest(
            tenant_id="acme",
            generation_id=generation.generation_id,
            value=pb.FeedbackValue(rating=pb.Rating(value=2)),
            client_feedback_id="fb-1",
        )
    )
    assert not retried.created
    assert retried.feedback.feedback_id == recorded.feedback.feedback_id
    fid = recorded.feedback.feedback_id
    edited = await stub.EditFeedback(
        api.EditFeedbackRequest(
            tenant_id="acme",
            feedback_id=fid,
            value=pb.FeedbackValue(rating=pb.Rating(value=5)),
            expected_revision=1,
        )
    )
    assert edited.feedback.revision == 2
    stale = await _error(
        stub.EditFeedback(
            api.EditFeedbackRequest(
                tenant_id="acme",
                feedback_id=fid,
                value=pb.FeedbackValue(rating=pb.Rating(value=3)),
                expected_revision=1,
            )
        )
    )
    assert stale.code() is grpc.StatusCode.FAILED_PRECONDITION
    await stub.RetractFeedback(api.RetractFeedbackRequest(tenant_id="acme", feedback_id=fid))
    listed = await stub.ListFeedback(api.ListFeedbackRequest(tenant_id="acme"))
    assert list(listed.feedback) == []
    with_retracted = await stub.ListFeedback(
        api.ListFeedbackRequest(tenant_id="acme", filter=api.FeedbackFilter(include_retracted=True))
    )
    assert [f.feedback_id for f in with_retracted.feedback] == [fid]

    # The outbox holds every change in order; the relay publishes it to the event log.
    await feedback_runtime.relay.drain()
    subscription = await feedback_runtime.bus.subscribe("test", ["flywheel.feedback.v1"])
    records = await subscription.poll(timeout_s=2.0)
    await subscription.close()
    assert [r.event_type for r in records] == [
        "feedback.recorded",
        "feedback.edited",
        "feedback.retracted",
    ]
    first = unpack(parse(records[0].value), FeedbackRecorded)
    assert first.feedback.feedback_id == fid
    assert first.generation.output == "Put 60% on search."
    edit = unpack(parse(records[1].value), FeedbackEdited)
    assert edit.previous_value.rating.value == 2
    assert edit.feedback.value.rating.value == 5


async def test_stats_and_export(stub: FeedbackServiceStub) -> None:
    await _tenant(stub, "acme")
    generation = await _generation(stub, "acme")
    for value in (
        pb.FeedbackValue(thumbs=pb.THUMB_DOWN),
        pb.FeedbackValue(thumbs=pb.THUMB_UP),
        pb.FeedbackValue(thumbs=pb.THUMB_DOWN),
        pb.FeedbackValue(rating=pb.Rating(value=4)),
        pb.FeedbackValue(rating=pb.Rating(value=2)),
    ):
        await stub.RecordFeedback(
            api.RecordFeedbackRequest(
                tenant_id="acme", generation_id=generation.generation_id, value=value
            )
        )
    stats = await stub.GetFeedbackStats(
        api.GetFeedbackStatsRequest(tenant_id="acme", group_by=[api.STATS_GROUP_BY_ADAPTER])
    )
    [bucket] = stats.buckets
    assert bucket.adapter == AdapterRef(name="acme-budget", version="v3")
    assert dict(bucket.count_by_kind) == {"thumbs": 3, "rating": 2}
    assert bucket.mean_rating == pytest.approx(3.0)
    assert bucket.thumbs_down_rate == pytest.approx(2 / 3)
    assert bucket.generation_count == 1

    lines = []
    async for chunk in stub.ExportFeedback(api.ExportFeedbackRequest(tenant_id="acme")):
        lines += [json.loads(line) for line in chunk.jsonl_chunk.decode().splitlines()]
    assert len(lines) == 5
    assert {line["kind"] for line in lines} == {"thumbs", "rating"}
    assert all(line["source"] == "human" for line in lines)
    assert lines[0]["generation"]["output"] == "Put 60% on search."


async def test_a_batch_commits_together_and_fails_item_by_item(stub: FeedbackServiceStub) -> None:
    await _tenant(stub, "acme")
    await _tenant(stub, "globex")
    mine = await _generation(stub, "acme")
    theirs = await _generation(stub, "globex")

    def item(tenant: str, generation_id: str, rating: int, cid: str | None = None) -> Any:
        return api.RecordFeedbackRequest(
            tenant_id=tenant,
            generation_id=generation_id,
            value=pb.FeedbackValue(rating=pb.Rating(value=rating)),
            client_feedback_id=cid,
        )

    response = await stub.BatchRecordFeedback(
        api.BatchRecordFeedbackRequest(
            requests=[
                item("acme", mine.generation_id, 5, cid="c-1"),
                item("acme", mine.generation_id, 9),  # invalid rating
                item("acme", theirs.generation_id, 3),  # another tenant's generation
                item("globex", theirs.generation_id, 2),
                item("acme", mine.generation_id, 5, cid="c-1"),  # duplicate in the batch
            ]
        )
    )
    outcomes = [r.WhichOneof("outcome") for r in response.results]
    assert outcomes == ["recorded", "error", "error", "recorded", "recorded"]
    first, invalid, foreign, other_tenant, duplicate = response.results
    assert first.recorded.created
    assert not duplicate.recorded.created
    assert duplicate.recorded.feedback.feedback_id == first.recorded.feedback.feedback_id
    assert invalid.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [v.field for v in invalid.error.field_violations] == ["value.rating.value"]
    assert foreign.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert other_tenant.recorded.feedback.tenant_id == "globex"
    acme = await stub.ListFeedback(api.ListFeedbackRequest(tenant_id="acme"))
    assert len(acme.feedback) == 1
