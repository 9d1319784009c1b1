"""Frame-timed exposure on votes

Six nullable columns on ``vote``: the requested exposure, the display's measured frame
period, the requested frame count, the measured onset and offset (the page's
``performance.now()`` clock, from ``requestAnimationFrame`` timestamps) and the measured
frame count. Existing votes keep nulls (they were shown without frame timing).

Revision ID: 0005_vote_exposure_timing
Revises: 0004_active_design
Create Date: 2026-12-04 19:45:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0005_vote_exposure_timing"
down_revision = "0004_active_design"
branch_labels = None
depends_on = None

COLUMNS = (
    ("exposure_requested_ms", sa.Float()),
    ("frame_period_ms", sa.Float()),
    ("exposure_frames_requested", sa.Integer()),
    ("exposure_onset_ms", sa.Float()),
    ("exposure_offset_ms", sa.Float()),
    ("exposure_frames_measured", sa.Integer()),
)


def upgrade():
    with op.batch_alter_table("vote", schema=None) as batch_op:
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))


def downgrade():
    with op.batch_alter_table("vote", schema=None) as batch_op:
        for name, _type in reversed(COLUMNS):
            batch_op.drop_column(name)
