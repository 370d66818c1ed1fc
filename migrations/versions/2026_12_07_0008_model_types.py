"""Model types: the catalog of model services an admin registered, each filling in a service spec.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 05:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('model_types',
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('task', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('image', sa.String(length=512), nullable=False),
    sa.Column('resources', sa.JSON(), nullable=False),
    sa.Column('replicas', sa.Integer(), nullable=False),
    sa.Column('probe', sa.JSON(), nullable=True),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_model_types'))
    )


def downgrade() -> None:
    op.drop_table('model_types')
