"""Scheduling by index: item draw keys, load-ordered indexes, a study's open leases

``item.draw_key`` is a fixed pseudo-random key per item, ``(id × 2654435761) mod
4294967311`` (the order the scheduler always broke load ties by, now stored), so the
lowest-load items are read from indexes in key order from a random start instead of
ordering every eligible item per request. Indexes: ``ix_item_study_load`` (study, votes,
key: a study's lowest-load items), ``ix_item_study_pair_load`` (the same per condition
pair; replaces ``ix_item_study_pair``, its prefix), ``ix_item_study_draw`` (a random
item for catch trials) and ``ix_trial_study_open`` (a study's leases by expiry).
Existing items: the key is filled from their ids, the same value new items get.

Revision ID: 0008_scheduling_load
Revises: 0007_display_calibration
Create Date: 2026-12-04 22:00:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0008_scheduling_load"
down_revision = "0007_display_calibration"
branch_labels = None
depends_on = None

# study_app.scheduling.DRAW_MULT / DRAW_MOD (a migration keeps its own copy)
FILL_DRAW_KEYS = "UPDATE item SET draw_key = (CAST(id AS BIGINT) * 2654435761) % 4294967311"


def upgrade():
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.add_column(sa.Column("draw_key", sa.BigInteger(), nullable=True))
    op.execute(FILL_DRAW_KEYS)
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.alter_column("draw_key", existing_type=sa.BigInteger(), nullable=False)
        batch_op.drop_index("ix_item_study_pair")
        batch_op.create_index("ix_item_study_load", ["study_id", "n_votes", "draw_key"])
        batch_op.create_index(
            "ix_item_study_pair_load",
            ["study_id", "condition_a_id", "condition_b_id", "n_votes", "draw_key"],
        )
        batch_op.create_index("ix_item_study_draw", ["study_id", "draw_key"])
    with op.batch_alter_table("trial", schema=None) as batch_op:
        batch_op.create_index("ix_trial_study_open", ["study_id", "status", "expires_at"])


def downgrade():
    with op.batch_alter_table("trial", schema=None) as batch_op:
        batch_op.drop_index("ix_trial_study_open")
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.drop_index("ix_item_study_draw")
        batch_op.drop_index("ix_item_study_pair_load")
        batch_op.drop_index("ix_item_study_load")
        batch_op.create_index(
            "ix_item_study_pair", ["study_id", "condition_a_id", "condition_b_id"], unique=False
        )
        batch_op.drop_column("draw_key")
