"""Ingest: the dead letters (rejected messages kept for inspection)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from controller.api.deps import ENGINEER, RuntimeDep
from controller.api.schemas import DeadLetterPublic

router = APIRouter()


@router.get(
    "/api/v1/ingest/dead-letters",
    response_model=list[DeadLetterPublic],
    tags=["ingest"],
    dependencies=ENGINEER,
)
def dead_letters(
    rt: RuntimeDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[DeadLetterPublic]:
    """The most recent rejected messages, kept for inspection."""
    return [DeadLetterPublic(**d) for d in rt.journal.dead_letters(limit)]
