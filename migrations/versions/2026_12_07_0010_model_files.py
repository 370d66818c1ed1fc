"""Model files: the hub's content-addressed store of files that services mount read-only.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 08:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('model_files',
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('uploaded_by', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('digest', name=op.f('pk_model_files'))
    )


def downgrade() -> None:
    op.drop_table('model_files')
