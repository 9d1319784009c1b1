"""Active design: the shared posterior, per-trial information gain, the stopping rule

``study_posterior`` holds an active study's condition-scale posterior (one row per study,
recomputed from the votes every ``posterior_every`` votes and shared by every server
process); ``trial.info_gain`` the expected information gain (bits) a main trial's pair had
when an active study chose it; ``study.main_closed_at`` / ``main_closed_reason`` when and
why the stopping rule stopped issuing main trials; index ``ix_item_study_pair`` finds a
pair's items. Existing rows: all new values empty
(balanced studies never set them).

Revision ID: 0004_active_design
Revises: 0003_owners_and_throttling
Create Date: 2026-12-04 19:30:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0004_active_design"
down_revision = "0003_owners_and_throttling"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("main_closed_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("main_closed_reason", sa.String(length=400), nullable=True))

    with op.batch_alter_table("trial", schema=None) as batch_op:
        batch_op.add_column(sa.Column("info_gain", sa.Float(), nullable=True))

    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.create_index(
            "ix_item_study_pair", ["study_id", "condition_a_id", "condition_b_id"], unique=False
        )

    op.create_table(
        "study_posterior",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("n_votes", sa.Integer(), nullable=False),
        sa.Column("conditions", sa.JSON(), nullable=False),
        sa.Column("posterior", sa.JSON(), nullable=False),
        sa.Column("computed_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_id"),
    )


def downgrade():
    op.drop_table("study_posterior")
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.drop_index("ix_item_study_pair")
    with op.batch_alter_table("trial", schema=None) as batch_op:
        batch_op.drop_column("info_gain")
    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_column("main_closed_reason")
        batch_op.drop_column("main_closed_at")
