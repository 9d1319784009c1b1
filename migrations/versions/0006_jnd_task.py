"""Sequential presentation and the JND task on votes

Six nullable columns on ``vote`` time the second image of a sequential trial (the
requested inter-stimulus interval, the second image's requested duration and frames, its
measured onset, offset and frames; the first image keeps the 0005 exposure columns), and
``vote.choice`` widens from 5 to 9 characters for the JND answers "same" / "different".
Existing votes keep nulls (none was sequential). A downgrade fails on PostgreSQL while
a JND answer "different" is stored (delete JND studies first).

Revision ID: 0006_jnd_task
Revises: 0005_vote_exposure_timing
Create Date: 2026-12-04 21:30:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0006_jnd_task"
down_revision = "0005_vote_exposure_timing"
branch_labels = None
depends_on = None

COLUMNS = (
    ("isi_requested_ms", sa.Float()),
    ("second_requested_ms", sa.Float()),
    ("second_frames_requested", sa.Integer()),
    ("second_onset_ms", sa.Float()),
    ("second_offset_ms", sa.Float()),
    ("second_frames_measured", sa.Integer()),
)


def upgrade():
    with op.batch_alter_table("vote", schema=None) as batch_op:
        batch_op.alter_column("choice", existing_type=sa.String(length=5),
                              type_=sa.String(length=9), existing_nullable=False)
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))


def downgrade():
    with op.batch_alter_table("vote", schema=None) as batch_op:
        for name, _type in reversed(COLUMNS):
            batch_op.drop_column(name)
        batch_op.alter_column("choice", existing_type=sa.String(length=9),
                              type_=sa.String(length=5), existing_nullable=False)
