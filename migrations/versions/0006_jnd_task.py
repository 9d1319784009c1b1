"""Sequential presentation and the JND task on votes

Six nullable columns on ``vote`` time the second image of a sequential trial (the
requested inter-stimulus interval, the second image's requested duration and frames, its
measured onset, offset and frames; the first image keeps the 0005 exposure columns), and
``vote.choice`` widens from 5 to 9 characters for the JND answers "same" / "different".
Existing votes keep nulls (none was sequential).

Downgrade: the six columns are dropped (their timings are lost) and ``vote.choice``
narrows back to 5 characters. A JND answer "different" does not fit, so it is stored as
"diff" (a warning counts them); every vote is kept, and ``vote.chosen_condition`` still
holds "different". Upgrading again turns "diff" back into "different" (no 2AFC answer is
ever "diff"), so a down-and-up round trip gives back the answers as they were stored.

Revision ID: 0006_jnd_task
Revises: 0005_vote_exposure_timing
Create Date: 2026-12-04 21:30:00

"""

import logging

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
# A JND answer too long for the 5-character column of 0005, and what it is stored as there.
DIFFERENT, DIFFERENT_IN_0005 = "different", "diff"

logger = logging.getLogger("alembic.versions.0006_jnd_task")


def _set_choice(new: str, where: str) -> sa.TextClause:
    """UPDATE every vote whose choice is ``where`` to ``new`` (literals: offline-safe)."""
    return sa.text(f"UPDATE vote SET choice = '{new}' WHERE choice = '{where}'")


def upgrade():
    with op.batch_alter_table("vote", schema=None) as batch_op:
        batch_op.alter_column("choice", existing_type=sa.String(length=5),
                              type_=sa.String(length=9), existing_nullable=False)
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))
    op.execute(_set_choice(DIFFERENT, where=DIFFERENT_IN_0005))


def downgrade():
    if not op.get_context().as_sql:  # offline (--sql) there is nothing to count
        count = sa.text("SELECT count(*) FROM vote WHERE choice = :answer")
        n = op.get_bind().execute(count, {"answer": DIFFERENT}).scalar()
        if n:
            logger.warning(
                "%d JND answers %r stored as %r (vote.choice holds 5 characters before "
                "0006_jnd_task; vote.chosen_condition keeps %r); upgrading again restores them",
                n,
                DIFFERENT,
                DIFFERENT_IN_0005,
                DIFFERENT,
            )
    op.execute(_set_choice(DIFFERENT_IN_0005, where=DIFFERENT))
    with op.batch_alter_table("vote", schema=None) as batch_op:
        for name, _type in reversed(COLUMNS):
            batch_op.drop_column(name)
        batch_op.alter_column("choice", existing_type=sa.String(length=9),
                              type_=sa.String(length=5), existing_nullable=False)
