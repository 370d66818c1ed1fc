"""Monitoring: usage alerts and each service's downsampled resource history.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('alerts',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('controller_id', sa.String(length=128), nullable=False),
    sa.Column('service_id', sa.String(length=32), nullable=True),
    sa.Column('container_id', sa.String(length=128), nullable=True),
    sa.Column('container_name', sa.String(length=255), nullable=True),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alerts'))
    )
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_alerts_controller_id'), ['controller_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_alerts_resolved_at'), ['resolved_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_alerts_service_id'), ['service_id'], unique=False)
        batch_op.create_index('ix_alerts_started_at', ['started_at'], unique=False)
    # At most one open alert per (kind, controller, container), whichever replica opens it.
    op.create_index('uq_alerts_open', 'alerts', ['kind', 'controller_id', sa.text("coalesce(container_id, '')")],
                    unique=True, postgresql_where=sa.text('resolved_at IS NULL'),
                    sqlite_where=sa.text('resolved_at IS NULL'))

    op.create_table('service_metrics',
    sa.Column('service_id', sa.String(length=32), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('samples', sa.Integer(), nullable=False),
    sa.Column('cpu_percent_avg', sa.Float(), nullable=False),
    sa.Column('cpu_percent_max', sa.Float(), nullable=False),
    sa.Column('memory_bytes_avg', sa.BigInteger(), nullable=False),
    sa.Column('memory_bytes_max', sa.BigInteger(), nullable=False),
    sa.Column('memory_percent_max', sa.Float(), nullable=False),
    sa.Column('network_rx_bytes', sa.BigInteger(), nullable=False),
    sa.Column('network_tx_bytes', sa.BigInteger(), nullable=False),
    sa.Column('block_read_bytes', sa.BigInteger(), nullable=False),
    sa.Column('block_write_bytes', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('service_id', 'at', name=op.f('pk_service_metrics'))
    )
    with op.batch_alter_table('service_metrics', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_service_metrics_at'), ['at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('service_metrics', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_service_metrics_at'))

    op.drop_table('service_metrics')
    op.drop_index('uq_alerts_open', table_name='alerts')
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_index('ix_alerts_started_at')
        batch_op.drop_index(batch_op.f('ix_alerts_service_id'))
        batch_op.drop_index(batch_op.f('ix_alerts_resolved_at'))
        batch_op.drop_index(batch_op.f('ix_alerts_controller_id'))

    op.drop_table('alerts')