"""What the daemon needs: why a session started and how it is stopped, the daemon's own row,
and each job's next scheduled run.

job_session gains ``trigger`` (manual, schedule, chain, retry, auto_retry; NULL in older rows
means manual), ``triggered_by`` (the session whose end started a chained one), ``retry_of``
(the session a retry repeats), ``drain_deadline`` (when a graceful stop turns immediate),
``stop_recursive`` (the stop also stops the sessions this one's chain started and keeps
chained jobs not yet started from starting) and ``stop_reason`` (user, window, shutdown).
All are nullable or have a server default, so the rows of older sessions stay valid; columns
are only added, so SQLite alters the table in place. The session references are plain
integers, not foreign keys: adding a foreign key would make SQLite copy the whole table.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # op.add_column, not batch mode: SQLite adds these columns in place, where batch mode
    # would copy the table for the server default of stop_recursive.
    for column in (
        sa.Column("trigger", sa.String(16), nullable=True),
        sa.Column("triggered_by", sa.Integer(), nullable=True),
        sa.Column("retry_of", sa.Integer(), nullable=True),
        sa.Column("drain_deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stop_recursive", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("stop_reason", sa.String(16), nullable=True),
    ):
        op.add_column("job_session", column)
    op.create_table(
        "daemon",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("config_path", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "job_schedule",
        sa.Column("job", sa.String(), nullable=False),
        sa.Column("next_run", sa.DateTime(timezone=True), nullable=True),
        sa.Column("schedule", sa.String(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job"),
    )


def downgrade() -> None:
    op.drop_table("job_schedule")
    op.drop_table("daemon")
    with op.batch_alter_table("job_session") as table:
        for column in ("stop_reason", "stop_recursive", "drain_deadline", "retry_of", "triggered_by", "trigger"):
            table.drop_column(column)
