"""VM identity: vm_task gains ``vm_id``, the stable id of the VM the task processed
(:attr:`providers.base.VmInfo.id`; vSphere ``config.instanceUuid``), which restore points and
CBT chains follow while names may change. Nullable: tasks of older sessions never recorded it,
and a task records it only once it has found its VM. ``vm_lock`` keys become
``provider/vm id`` instead of ``provider/vm name``; that needs no change of the schema, and a
lock row of a name-keyed older runner is released as before when its session ends or dies.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # op.add_column, not batch mode: SQLite adds a nullable column in place.
    op.add_column("vm_task", sa.Column("vm_id", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vm_task") as table:
        table.drop_column("vm_id")
