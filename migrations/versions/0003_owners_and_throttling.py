"""Owners, collaborators and admins; failed logins for throttling

Studies and stimulus sets get an owner, studies get collaborators (viewer / editor),
researchers an admin flag, and wrong passwords are counted in ``login_failure``.

Existing data: the oldest researcher (earliest ``created_at``, then lowest id) becomes an
admin. Each existing study is owned by the researcher who created it on the web page
(``created_by_id``) or else by that admin; every existing stimulus set is owned by that
admin. Without any researcher nothing gets an owner: such studies and sets are seen only
by admins (``pstudy researcher create --admin``, ``pstudy study set-owner``).

Revision ID: 0003_owners_and_throttling
Revises: 0002_researcher_login
Create Date: 2026-12-09 10:00:00

"""

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision = "0003_owners_and_throttling"
down_revision = "0002_researcher_login"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("researcher", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("is_admin", sa.Boolean(), server_default=sa.false(), nullable=False)
        )

    with op.batch_alter_table("stimulus_set", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_stimulus_set_owner_id"), ["owner_id"], unique=False)
        batch_op.create_foreign_key(
            "fk_stimulus_set_owner_id_researcher", "researcher", ["owner_id"], ["id"],
            ondelete="SET NULL",
        )

    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_study_owner_id"), ["owner_id"], unique=False)
        batch_op.create_foreign_key(
            "fk_study_owner_id_researcher", "researcher", ["owner_id"], ["id"],
            ondelete="SET NULL",
        )

    op.create_table(
        "study_collaborator",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("researcher_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["researcher_id"], ["researcher.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_id", "researcher_id"),
    )
    with op.batch_alter_table("study_collaborator", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_study_collaborator_researcher_id"), ["researcher_id"], unique=False
        )

    op.create_table(
        "login_failure",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("login_failure", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_login_failure_address"), ["address"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_login_failure_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_login_failure_email"), ["email"], unique=False)

    assign_existing_data()


def assign_existing_data():
    """The oldest researcher becomes admin; existing studies and sets get owners."""
    connection = op.get_bind()
    researcher = sa.table(
        "researcher", sa.column("id"), sa.column("created_at"), sa.column("is_admin")
    )
    study = sa.table("study", sa.column("id"), sa.column("owner_id"), sa.column("created_by_id"))
    stimulus_set = sa.table("stimulus_set", sa.column("id"), sa.column("owner_id"))
    admin_id = connection.execute(
        sa.select(researcher.c.id).order_by(researcher.c.created_at, researcher.c.id).limit(1)
    ).scalar()
    if admin_id is None:
        return  # no account: studies and sets stay unowned (admins only)
    connection.execute(
        sa.update(researcher).where(researcher.c.id == admin_id).values(is_admin=True)
    )
    connection.execute(
        sa.update(study)
        .where(study.c.created_by_id.is_not(None))
        .values(owner_id=study.c.created_by_id)
    )
    connection.execute(
        sa.update(study).where(study.c.owner_id.is_(None)).values(owner_id=admin_id)
    )
    connection.execute(sa.update(stimulus_set).values(owner_id=admin_id))


def downgrade():
    with op.batch_alter_table("login_failure", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_login_failure_email"))
        batch_op.drop_index(batch_op.f("ix_login_failure_created_at"))
        batch_op.drop_index(batch_op.f("ix_login_failure_address"))
    op.drop_table("login_failure")

    with op.batch_alter_table("study_collaborator", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_collaborator_researcher_id"))
    op.drop_table("study_collaborator")

    with op.batch_alter_table("study", schema=None) as batch_op:
        batch_op.drop_constraint("fk_study_owner_id_researcher", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_study_owner_id"))
        batch_op.drop_column("owner_id")

    with op.batch_alter_table("stimulus_set", schema=None) as batch_op:
        batch_op.drop_constraint("fk_stimulus_set_owner_id_researcher", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_stimulus_set_owner_id"))
        batch_op.drop_column("owner_id")

    with op.batch_alter_table("researcher", schema=None) as batch_op:
        batch_op.drop_column("is_admin")
