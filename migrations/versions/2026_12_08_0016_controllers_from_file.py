"""Controllers the file listed (a reload or a start deletes them once gone from it) and controllers deleted
(their heartbeats no longer register them again).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-08 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0016'
down_revision: str | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('mmanager_controllers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('from_file', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    op.create_table('deleted_controllers',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deleted_controllers'))
    )


def downgrade() -> None:
    op.drop_table('deleted_controllers')
    with op.batch_alter_table('mmanager_controllers', schema=None) as batch_op:
        batch_op.drop_column('from_file')
