"""``hub.db_direct.Binders``: a Core statement compiled once for asyncpg, its arguments in the order of its
``$n`` placeholders, through the columns' bind processors. No server: the asyncpg dialect only compiles."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, bindparam, select, update
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.types import TypeDecorator

from hub.db_direct import Binders, any_of


class Upper(TypeDecorator[str]):
    impl = String
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return value.upper() if value is not None else None


_T = Table("t", MetaData(), Column("id", Integer, primary_key=True), Column("kind", Upper()),
           Column("doc", JSON), Column("state", String))


@pytest.fixture
def binders() -> Binders:
    # Creating the engine opens no connection; its dialect is asyncpg's.
    return Binders(create_async_engine("postgresql+asyncpg://u@localhost/nowhere").dialect)


def test_arguments_follow_the_placeholders(binders: Binders) -> None:
    statement = (update(_T).where(_T.c.id == bindparam("id"), _T.c.state == "ready")
                 .values(kind=bindparam("kind"), doc=bindparam("doc")))
    sql, *args = binders.bind(statement, {"doc": {"a": 1}, "id": 7, "kind": "gpu"})
    assert "$4" in sql and "$5" not in sql
    # The statement's own value ("ready") and the column's processors (Upper, JSON) applied.
    assert args == ["GPU", '{"a": 1}', 7, "ready"]
    assert binders.binder(statement) is binders.binder(statement)  # compiled once


def test_a_missing_value_and_an_in_list_are_refused(binders: Binders) -> None:
    statement = select(_T.c.id).where(_T.c.id == bindparam("id"))
    with pytest.raises(KeyError, match="'id'"):
        binders.bind(statement, {})
    with pytest.raises(ValueError, match="expanding"):
        binders.bind(select(_T.c.id).where(any_of(_T.c.id, "ids", sqlite=True)), {"ids": [1]})
    sql, ids = binders.bind(select(_T.c.id).where(any_of(_T.c.id, "ids", sqlite=False)), {"ids": [1, 2]})
    assert "ANY" in sql and ids == [1, 2]
