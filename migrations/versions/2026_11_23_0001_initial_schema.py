"""Initial schema: the seed's four tables plus services, users and tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 01:55:19.604515
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('container_operations',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('service_id', sa.String(length=32), nullable=True),
    sa.Column('controller_id', sa.String(length=128), nullable=True),
    sa.Column('container_id', sa.String(length=128), nullable=True),
    sa.Column('operation', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_container_operations'))
    )
    with op.batch_alter_table('container_operations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_container_operations_controller_id'), ['controller_id'], unique=False)
        batch_op.create_index('ix_container_operations_created_at', ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_container_operations_service_id'), ['service_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_container_operations_status'), ['status'], unique=False)

    op.create_table('mmanager_controllers',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('url', sa.String(length=512), nullable=False),
    sa.Column('server_type', sa.String(length=16), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('draining', sa.Boolean(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('weight', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('max_containers', sa.Integer(), nullable=False),
    sa.Column('containers_running', sa.Integer(), nullable=False),
    sa.Column('load_percentage', sa.Float(), nullable=False),
    sa.Column('memory_usage_percent', sa.Float(), nullable=False),
    sa.Column('cpu_cores', sa.Float(), nullable=False),
    sa.Column('memory_total_gb', sa.Float(), nullable=False),
    sa.Column('memory_available_gb', sa.Float(), nullable=False),
    sa.Column('gpus', sa.JSON(), nullable=False),
    sa.Column('health_data', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_mmanager_controllers'))
    )
    op.create_table('users',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('is_admin', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('username', name=op.f('uq_users_username'))
    )
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_api_tokens_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_tokens_user_id'), ['user_id'], unique=False)

    op.create_table('model_services',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('repo', sa.String(length=128), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('desired_state', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_message', sa.Text(), nullable=True),
    sa.Column('controller_id', sa.String(length=128), nullable=True),
    sa.Column('container_id', sa.String(length=128), nullable=True),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('endpoint', sa.JSON(), nullable=True),
    sa.Column('gpu_devices', sa.JSON(), nullable=False),
    sa.Column('health', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_model_services_owner_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_services')),
    sa.UniqueConstraint('owner_id', 'name', name=op.f('uq_model_services_owner_id'))
    )
    with op.batch_alter_table('model_services', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_services_controller_id'), ['controller_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_model_services_owner_id'), ['owner_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_model_services_status'), ['status'], unique=False)

    op.create_table('container_registry',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('service_id', sa.String(length=32), nullable=False),
    sa.Column('controller_id', sa.String(length=128), nullable=False),
    sa.Column('container_id', sa.String(length=128), nullable=True),
    sa.Column('container_name', sa.String(length=255), nullable=False),
    sa.Column('image', sa.String(length=512), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('memory_bytes', sa.BigInteger(), nullable=False),
    sa.Column('cpu_limit', sa.Float(), nullable=False),
    sa.Column('gpu_devices', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['service_id'], ['model_services.id'], name=op.f('fk_container_registry_service_id_model_services'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_container_registry'))
    )
    with op.batch_alter_table('container_registry', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_container_registry_controller_id'), ['controller_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_container_registry_service_id'), ['service_id'], unique=False)

    op.create_table('service_deployment_history',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('service_id', sa.String(length=32), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('image', sa.String(length=512), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['service_id'], ['model_services.id'], name=op.f('fk_service_deployment_history_service_id_model_services'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_service_deployment_history')),
    sa.UniqueConstraint('service_id', 'version', name=op.f('uq_service_deployment_history_service_id'))
    )
    with op.batch_alter_table('service_deployment_history', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_service_deployment_history_service_id'), ['service_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('service_deployment_history', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_service_deployment_history_service_id'))

    op.drop_table('service_deployment_history')
    with op.batch_alter_table('container_registry', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_container_registry_service_id'))
        batch_op.drop_index(batch_op.f('ix_container_registry_controller_id'))

    op.drop_table('container_registry')
    with op.batch_alter_table('model_services', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_services_status'))
        batch_op.drop_index(batch_op.f('ix_model_services_owner_id'))
        batch_op.drop_index(batch_op.f('ix_model_services_controller_id'))

    op.drop_table('model_services')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_tokens_user_id'))

    op.drop_table('api_tokens')
    op.drop_table('users')
    op.drop_table('mmanager_controllers')
    with op.batch_alter_table('container_operations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_container_operations_status'))
        batch_op.drop_index(batch_op.f('ix_container_operations_service_id'))
        batch_op.drop_index('ix_container_operations_created_at')
        batch_op.drop_index(batch_op.f('ix_container_operations_controller_id'))

    op.drop_table('container_operations')
