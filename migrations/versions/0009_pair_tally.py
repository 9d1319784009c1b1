"""Per-pair vote tallies kept by triggers: item.n_a_wins and table pair_tally

``item.n_a_wins`` counts the item's 2afc votes that chose condition a (filled from the
stored votes). ``pair_tally`` holds, per study, condition pair and vote level, the items
at that level and their wins for a (filled from the items; a new study's rows are made
with its items); triggers on ``item`` keep it exact from now on. The active design reads
its per-pair counts and win matrix there instead of scanning every item and every vote
of the study per request.

(A later migration that rebuilds ``item`` with ``batch_alter_table`` on SQLite drops its
triggers with the old table: it must create them again.)

Revision ID: 0009_pair_tally
Revises: 0008_scheduling_load
Create Date: 2026-12-05 03:00:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0009_pair_tally"
down_revision = "0008_scheduling_load"
branch_labels = None
depends_on = None

# a migration keeps its own copy of the triggers (study_app.models has the same)
_KEY = ("study_id = {row}.study_id AND condition_a_id = {row}.condition_a_id "
        "AND condition_b_id = {row}.condition_b_id AND n_votes = {row}.n_votes")
_JOIN_SQLITE = (
    "INSERT OR IGNORE INTO pair_tally (study_id, condition_a_id, condition_b_id, n_votes, "
    "n_items, a_wins) VALUES (NEW.study_id, NEW.condition_a_id, NEW.condition_b_id, "
    "NEW.n_votes, 0, 0); UPDATE pair_tally SET n_items = n_items + 1, "
    "a_wins = a_wins + NEW.n_a_wins WHERE " + _KEY.format(row="NEW") + ";")
_LEAVE_SQLITE = ("UPDATE pair_tally SET n_items = n_items - 1, a_wins = a_wins - "
                 "OLD.n_a_wins WHERE " + _KEY.format(row="OLD") + ";")
TRIGGERS_SQLITE = (
    "CREATE TRIGGER tr_item_tally_update AFTER UPDATE OF n_votes, n_a_wins ON item BEGIN "
    + _LEAVE_SQLITE + " " + _JOIN_SQLITE + " END",
    "CREATE TRIGGER tr_item_tally_delete AFTER DELETE ON item BEGIN " + _LEAVE_SQLITE + " END",
)
TRIGGERS_POSTGRESQL = (
    """CREATE FUNCTION item_pair_tally() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pair_tally SET n_items = n_items - 1, a_wins = a_wins - OLD.n_a_wins
    WHERE """ + _KEY.format(row="OLD") + """;
    IF TG_OP = 'UPDATE' THEN
        INSERT INTO pair_tally AS t (study_id, condition_a_id, condition_b_id, n_votes,
                                     n_items, a_wins)
        VALUES (NEW.study_id, NEW.condition_a_id, NEW.condition_b_id, NEW.n_votes, 1,
                NEW.n_a_wins)
        ON CONFLICT (study_id, condition_a_id, condition_b_id, n_votes)
        DO UPDATE SET n_items = t.n_items + 1, a_wins = t.a_wins + EXCLUDED.a_wins;
    END IF;
    RETURN NULL;
END $$""",
    "CREATE TRIGGER tr_item_pair_tally AFTER DELETE OR UPDATE OF n_votes, n_a_wins ON item "
    "FOR EACH ROW EXECUTE FUNCTION item_pair_tally()",
)

# a main, non-preview 2afc vote chose condition a when its side is the one a was shown on
FILL_WINS = """
UPDATE item SET n_a_wins = (
    SELECT count(*) FROM vote JOIN trial ON trial.id = vote.trial_id
    WHERE trial.item_id = item.id AND trial.kind = 'main' AND trial.preview = {false}
      AND vote.choice IN ('left', 'right')
      AND (vote.choice = 'left') = trial.a_left)
"""
FILL_TALLY = """
INSERT INTO pair_tally (study_id, condition_a_id, condition_b_id, n_votes, n_items, a_wins)
SELECT study_id, condition_a_id, condition_b_id, n_votes, count(*), sum(n_a_wins)
FROM item GROUP BY study_id, condition_a_id, condition_b_id, n_votes
"""


def upgrade():
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("n_a_wins", sa.Integer(), server_default="0", nullable=False))
    op.execute(FILL_WINS.format(false="false" if dialect == "postgresql" else "0"))
    op.create_table(
        "pair_tally",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("condition_a_id", sa.Integer(), nullable=False),
        sa.Column("condition_b_id", sa.Integer(), nullable=False),
        sa.Column("n_votes", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("n_items", sa.Integer(), nullable=False),
        sa.Column("a_wins", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["condition_a_id"], ["condition.id"]),
        sa.ForeignKeyConstraint(["condition_b_id"], ["condition.id"]),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("study_id", "condition_a_id", "condition_b_id", "n_votes"),
    )
    op.execute(FILL_TALLY)
    for statement in TRIGGERS_POSTGRESQL if dialect == "postgresql" else TRIGGERS_SQLITE:
        op.execute(statement)


def downgrade():
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER tr_item_pair_tally ON item")
        op.execute("DROP FUNCTION item_pair_tally()")
    else:
        for name in ("tr_item_tally_update", "tr_item_tally_delete"):
            op.execute(f"DROP TRIGGER {name}")
    op.drop_table("pair_tally")
    with op.batch_alter_table("item", schema=None) as batch_op:
        batch_op.drop_column("n_a_wins")
