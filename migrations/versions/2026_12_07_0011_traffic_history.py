"""Traffic and GPU history: requests, 5xx, latency histogram and GPU use per service_metrics bucket.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 11:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ('gpu_memory_bytes_max', 'gpu_util_percent_avg', 'requests', 'errors_5xx', 'latency_buckets')


def upgrade() -> None:
    with op.batch_alter_table('service_metrics', schema=None) as batch_op:
        batch_op.add_column(sa.Column('gpu_memory_bytes_max', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('gpu_util_percent_avg', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('requests', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('errors_5xx', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('latency_buckets', sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('service_metrics', schema=None) as batch_op:
        for column in reversed(COLUMNS):
            batch_op.drop_column(column)
