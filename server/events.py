"""Behavioural history for the delivery path. Until event ingestion lands (issue 3), behavioural
conditions see no events: this source answers with an empty history, without I/O."""

from __future__ import annotations

from datetime import datetime

from content.behaviour import EMPTY_HISTORY, History


class NoHistory:
    async def history(self, *, user_id: str | None, anonymous_id: str | None, now: datetime) -> History:
        return EMPTY_HISTORY
