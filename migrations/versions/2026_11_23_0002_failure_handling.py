"""Failure handling: hub replicas, who runs each operation, container health, pushed heartbeats.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 14:14:56.584225
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('hub_replicas',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('hostname', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('is_leader', sa.Boolean(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_replicas'))
    )
    with op.batch_alter_table('hub_replicas', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hub_replicas_last_seen_at'), ['last_seen_at'], unique=False)

    with op.batch_alter_table('container_operations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('hub_replica', sa.String(length=32), nullable=True))

    with op.batch_alter_table('container_registry', schema=None) as batch_op:
        batch_op.add_column(sa.Column('health', sa.String(length=16), nullable=False, server_default='unknown'))
        batch_op.add_column(sa.Column('health_restarts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.create_index(batch_op.f('ix_container_registry_status'), ['status'], unique=False)

    with op.batch_alter_table('mmanager_controllers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_push_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('mmanager_controllers', schema=None) as batch_op:
        batch_op.drop_column('last_push_at')

    with op.batch_alter_table('container_registry', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_container_registry_status'))
        batch_op.drop_column('health_restarts')
        batch_op.drop_column('health')

    with op.batch_alter_table('container_operations', schema=None) as batch_op:
        batch_op.drop_column('hub_replica')

    with op.batch_alter_table('hub_replicas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hub_replicas_last_seen_at'))

    op.drop_table('hub_replicas')
