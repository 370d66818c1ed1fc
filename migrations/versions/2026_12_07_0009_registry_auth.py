"""Registry auth: a service's registry credentials, sealed under the hub key (hub.sealing).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 08:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('model_services', schema=None) as batch_op:
        batch_op.add_column(sa.Column('registry_auth_sealed', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('model_services', schema=None) as batch_op:
        batch_op.drop_column('registry_auth_sealed')
