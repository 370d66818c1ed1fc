"""The admin's cap on a controller's containers (PATCH /api/admin/controllers/{id} max_containers).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0015'
down_revision: str | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('mmanager_controllers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_containers_cap', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('mmanager_controllers', schema=None) as batch_op:
        batch_op.drop_column('max_containers_cap')
