"""Replicas: each service's count of copies; on each registry row, whether it is one and its endpoint.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('model_services', schema=None) as batch_op:
        batch_op.add_column(sa.Column('replicas', sa.Integer(), server_default='1', nullable=False))
    with op.batch_alter_table('container_registry', schema=None) as batch_op:
        batch_op.add_column(sa.Column('serving', sa.Boolean(), server_default=sa.text('false'), nullable=False))
        batch_op.add_column(sa.Column('endpoint', sa.JSON(), nullable=True))
    # The copy each service points at is its one replica; its endpoint is the service's.
    op.execute(
        "UPDATE container_registry SET serving = true, endpoint = ("
        "SELECT s.endpoint FROM model_services s WHERE s.id = container_registry.service_id) "
        "WHERE status NOT IN ('stale', 'draining') AND container_id = ("
        "SELECT s.container_id FROM model_services s WHERE s.id = container_registry.service_id)"
    )


def downgrade() -> None:
    with op.batch_alter_table('container_registry', schema=None) as batch_op:
        batch_op.drop_column('endpoint')
        batch_op.drop_column('serving')
    with op.batch_alter_table('model_services', schema=None) as batch_op:
        batch_op.drop_column('replicas')
