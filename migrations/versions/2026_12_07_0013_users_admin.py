"""Users at run time: disabled users, per-user quotas, and named tokens with their last use.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 15:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0013'
down_revision: str | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

USER_COLUMNS = ('disabled_at', 'max_services', 'max_gpus', 'max_memory_bytes')
TOKEN_COLUMNS = ('name', 'last_used_at')


def upgrade() -> None:
    with op.batch_alter_table('users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('disabled_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('max_services', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_gpus', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_memory_bytes', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        for column in reversed(TOKEN_COLUMNS):
            batch_op.drop_column(column)
    with op.batch_alter_table('users', schema=None) as batch_op:
        for column in reversed(USER_COLUMNS):
            batch_op.drop_column(column)
