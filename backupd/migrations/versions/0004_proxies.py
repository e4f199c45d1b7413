"""What backup proxies need: the ``proxy`` table (each proxy process, its pool, capacity,
VM tasks running and heartbeat) and, per VM task, when it was handed to the broker and which
proxy (host id, pid) processed it.

Columns are only added, all nullable, so older rows stay valid.

Revision ID: 0004
Revises: 0002 (re-chained onto 0003 when the stable-VM-id branch is merged)
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for column in (
        sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("proxy_host", sa.String(), nullable=True),
        sa.Column("proxy_pid", sa.Integer(), nullable=True),
    ):
        op.add_column("vm_task", column)
    op.create_table(
        "proxy",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("host", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("pool", sa.String(), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("running", sa.Integer(), nullable=False),
        sa.Column("peak_running", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("note", sa.String(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index("ix_proxy_pool", "proxy", ["pool"])


def downgrade() -> None:
    op.drop_index("ix_proxy_pool", "proxy")
    op.drop_table("proxy")
    with op.batch_alter_table("vm_task") as table:
        for column in ("proxy_pid", "proxy_host", "dispatched_at"):
            table.drop_column(column)
