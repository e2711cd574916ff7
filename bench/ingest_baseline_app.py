"""The baseline of bench/ingest.py: the simplest honest way to take feedback over HTTP.

A bare FastAPI endpoint that validates a small JSON body and inserts one row with SQLAlchemy,
committing per request, as a team would write it on day one. Run by the benchmark as
``uvicorn ingest_baseline_app:app`` with ``BASELINE_DATABASE_URL`` set.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

from fastapi import FastAPI
from pydantic import BaseModel, Field
from sqlalchemy import DateTime, Integer, String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Feedback(Base):
    __tablename__ = "baseline_feedback"

    feedback_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    generation_id: Mapped[str] = mapped_column(String(36))
    rating: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


engine = create_async_engine(os.environ["BASELINE_DATABASE_URL"], pool_size=20, max_overflow=20)
sessions = async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


class FeedbackIn(BaseModel):
    generation_id: str = Field(max_length=36)
    rating: int = Field(ge=1, le=5)


@app.post("/v1/feedback", status_code=201)
async def record(body: FeedbackIn) -> dict[str, str]:
    """Insert one row and commit before answering."""
    row = Feedback(
        feedback_id=str(uuid.uuid4()),
        generation_id=body.generation_id,
        rating=body.rating,
        created_at=datetime.now(UTC),
    )
    async with sessions() as session:
        session.add(row)
        await session.commit()
    return {"feedback_id": row.feedback_id}
