"""Display calibration on participants

Nullable columns on ``participant`` for the display check before the trials
(study_app.calibration): its status, attempts and time; the reported devicePixelRatio,
screen size and browser-zoom estimate, and whether the stimuli are unscaled; the card
calibration (outline width in CSS px, CSS px per mm) and the blind-spot estimate
(fixation-to-blind-spot CSS px, viewing distance in mm, CSS px per degree).
Existing participants keep nulls (no check), and 0 attempts.

Revision ID: 0007_display_calibration
Revises: 0006_jnd_task
Create Date: 2026-12-04 21:40:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0007_display_calibration"
down_revision = "0006_jnd_task"
branch_labels = None
depends_on = None

COLUMNS = (
    ("display_status", sa.String(length=8)),
    ("display_checked_at", sa.DateTime()),
    ("display_dpr", sa.Float()),
    ("display_screen_w", sa.Integer()),
    ("display_screen_h", sa.Integer()),
    ("display_zoom", sa.Float()),
    ("display_scaling_ok", sa.Boolean()),
    ("card_width_px", sa.Float()),
    ("px_per_mm", sa.Float()),
    ("blind_spot_px", sa.Float()),
    ("viewing_distance_mm", sa.Float()),
    ("px_per_deg", sa.Float()),
)


def upgrade():
    with op.batch_alter_table("participant", schema=None) as batch_op:
        for name, type_ in COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))
        batch_op.add_column(
            sa.Column("display_attempts", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade():
    with op.batch_alter_table("participant", schema=None) as batch_op:
        batch_op.drop_column("display_attempts")
        for name, _type in reversed(COLUMNS):
            batch_op.drop_column(name)
