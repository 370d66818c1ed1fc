"""Paging parameters shared by every list endpoint (``limit`` default 100, at most 1000)."""

from __future__ import annotations

from fastapi import Query

# Far beyond any table here, and inside every database's integer range: an offset of 10**30
# is bad input (422), not a query the database has to refuse.
MAX_OFFSET = 2**31 - 1

Limit = Query(100, ge=1, le=1000)
Offset = Query(0, ge=0, le=MAX_OFFSET)
