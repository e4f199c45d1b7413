"""The state DB as backupd made it before it had migrations: job sessions, VM tasks, session
log lines and VM locks.

Enum columns hold the enum's lower-case value in a VARCHAR(16) (see ``_stored_as_value`` in
backupd/state.py); times are timezone-aware UTC (``timestamp with time zone`` on PostgreSQL).

Revision ID: 0001
Revises: (none)
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "job_session",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job", sa.String(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("result", sa.String(16), nullable=True),
        sa.Column("message", sa.String(), nullable=True),
        sa.Column("full", sa.Boolean(), nullable=False),
        sa.Column("stop_mode", sa.String(16), nullable=True),
        sa.Column("stop_message", sa.String(), nullable=True),
        sa.Column("stop_requested_at", _utc(), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("ended_at", _utc(), nullable=True),
        sa.Column("owner_host", sa.String(), nullable=True),
        sa.Column("owner_pid", sa.Integer(), nullable=True),
        sa.Column("heartbeat_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_session_job", "job_session", ["job"])
    op.create_table(
        "vm_lock",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("acquired_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "session_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("level", sa.String(), nullable=False),
        sa.Column("vm", sa.String(), nullable=True),
        sa.Column("text", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["session_id"], ["job_session.id"]),
    )
    op.create_index("ix_session_log_session_id", "session_log", ["session_id"])
    op.create_table(
        "vm_task",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("vm", sa.String(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(), nullable=True),
        sa.Column("mode", sa.String(), nullable=True),
        sa.Column("bytes_read", sa.Integer(), nullable=False),
        sa.Column("bytes_total", sa.Integer(), nullable=False),
        sa.Column("bytes_stored", sa.Integer(), nullable=False),
        sa.Column("restore_point", sa.String(), nullable=True),
        sa.Column("snapshot_id", sa.String(), nullable=True),
        sa.Column("snapshot_removed", sa.Boolean(), nullable=False),
        sa.Column("snapshot_error", sa.String(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("warning", sa.String(), nullable=True),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("ended_at", _utc(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["session_id"], ["job_session.id"]),
    )
    op.create_index("ix_vm_task_session_id", "vm_task", ["session_id"])


def downgrade() -> None:
    for table in ("vm_task", "session_log", "vm_lock", "job_session"):
        op.drop_table(table)
