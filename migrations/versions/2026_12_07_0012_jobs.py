"""Batch jobs: jobs, their attempts, artifacts, pipelines, and job_id on operations.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 13:47:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('pipelines',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_pipelines_owner_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipelines'))
    )
    with op.batch_alter_table('pipelines', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pipelines_owner_id'), ['owner_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_pipelines_status'), ['status'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=63), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('status_message', sa.Text(), nullable=True),
    sa.Column('wait_reasons', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('retries', sa.Integer(), nullable=False),
    sa.Column('timeout', sa.Float(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('pipeline_id', sa.String(length=32), nullable=True),
    sa.Column('step', sa.String(length=63), nullable=True),
    sa.Column('needs', sa.JSON(), nullable=False),
    sa.Column('not_before', sa.DateTime(timezone=True), nullable=True),
    sa.Column('progress', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_jobs_owner_id_users'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['pipeline_id'], ['pipelines.id'], name=op.f('fk_jobs_pipeline_id_pipelines'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_owner_id'), ['owner_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_jobs_pipeline_id'), ['pipeline_id'], unique=False)
        batch_op.create_index('ix_jobs_queue', ['status', 'priority', 'created_at'], unique=False)

    op.create_table('artifacts',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('attempt_id', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_artifacts_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['owner_id'], ['users.id'], name=op.f('fk_artifacts_owner_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_artifacts'))
    )
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_artifacts_digest'), ['digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_artifacts_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_artifacts_owner_id'), ['owner_id'], unique=False)

    op.create_table('job_attempts',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('controller_id', sa.String(length=128), nullable=False),
    sa.Column('container_id', sa.String(length=128), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('memory_bytes', sa.BigInteger(), nullable=False),
    sa.Column('cpu_limit', sa.Float(), nullable=False),
    sa.Column('gpu_devices', sa.JSON(), nullable=False),
    sa.Column('log_digest', sa.String(length=71), nullable=True),
    sa.Column('log_size', sa.BigInteger(), nullable=False),
    sa.Column('progress', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('hub_replica', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_attempts_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_attempts')),
    sa.UniqueConstraint('job_id', 'number', name=op.f('uq_job_attempts_job_id'))
    )
    with op.batch_alter_table('job_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_attempts_controller_id'), ['controller_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_attempts_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_job_attempts_status'), ['status'], unique=False)

    with op.batch_alter_table('container_operations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('job_id', sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f('ix_container_operations_job_id'), ['job_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('container_operations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_container_operations_job_id'))
        batch_op.drop_column('job_id')

    with op.batch_alter_table('job_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_attempts_status'))
        batch_op.drop_index(batch_op.f('ix_job_attempts_job_id'))
        batch_op.drop_index(batch_op.f('ix_job_attempts_controller_id'))

    op.drop_table('job_attempts')
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_artifacts_owner_id'))
        batch_op.drop_index(batch_op.f('ix_artifacts_job_id'))
        batch_op.drop_index(batch_op.f('ix_artifacts_digest'))

    op.drop_table('artifacts')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_queue')
        batch_op.drop_index(batch_op.f('ix_jobs_pipeline_id'))
        batch_op.drop_index(batch_op.f('ix_jobs_owner_id'))

    op.drop_table('jobs')
    with op.batch_alter_table('pipelines', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pipelines_status'))
        batch_op.drop_index(batch_op.f('ix_pipelines_owner_id'))

    op.drop_table('pipelines')
