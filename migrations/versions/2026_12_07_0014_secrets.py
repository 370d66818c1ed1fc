"""Secrets: a service's spec's secrets (environment variables), sealed under the hub key (hub.services.secrets).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014'
down_revision: str | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('model_services', schema=None) as batch_op:
        batch_op.add_column(sa.Column('secrets_sealed', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('model_services', schema=None) as batch_op:
        batch_op.drop_column('secrets_sealed')
