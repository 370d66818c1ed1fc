"""Health detail: why a copy (and a service's primary copy) is unhealthy, e.g. a probe's wrong answer.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 05:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('model_services', schema=None) as batch_op:
        batch_op.add_column(sa.Column('health_detail', sa.Text(), nullable=True))
    with op.batch_alter_table('container_registry', schema=None) as batch_op:
        batch_op.add_column(sa.Column('health_detail', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('container_registry', schema=None) as batch_op:
        batch_op.drop_column('health_detail')
    with op.batch_alter_table('model_services', schema=None) as batch_op:
        batch_op.drop_column('health_detail')
