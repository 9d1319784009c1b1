"""Who may see and do what: owners, collaborators (viewer / editor) and admins.

Roles on a study, weakest first:

- ``viewer`` (a collaborator): the dashboard and its numbers, the downloads (responses,
  configuration, manifest), the participant preview;
- ``editor`` (a collaborator): also start / pause / resume / close the study (and any
  setting that becomes editable later);
- ``owner`` (``study.owner_id``; the researcher who created it): also shares it (adds,
  changes and removes collaborators by e-mail);
- ``admin`` (``researcher.is_admin``): everything on every study and stimulus set,
  including the ones without an owner.

Anyone else is a stranger: for them the study does not exist (404, the same answer as for
a slug nobody uses), and the index does not list it.

Stimulus sets belong to whoever imported them. A set can be used for a new study by its
owner, an admin, and the owners and editors of a study that already uses it (they run a
study that shows those images already); viewers cannot.
"""

from __future__ import annotations

from sqlalchemy import Select, or_, select

from study_app.auth import researcher_by_email
from study_app.extensions import db
from study_app.models import (
    COLLABORATOR_ROLES,
    Researcher,
    StimulusSet,
    Study,
    StudyCollaborator,
)

VIEW, EDIT, MANAGE = "viewer", "editor", "owner"
LEVELS = {"viewer": 1, "editor": 2, "owner": 3, "admin": 4}


class AccessError(ValueError):
    """A sharing request that cannot be done; the message says why."""


def study_role(researcher: Researcher | None, study: Study) -> str | None:
    """``admin``, ``owner``, ``editor``, ``viewer`` or None (a stranger)."""
    if researcher is None:
        return None
    if researcher.is_admin:
        return "admin"
    if study.owner_id is not None and study.owner_id == researcher.id:
        return "owner"
    return db.session.scalar(
        select(StudyCollaborator.role).where(
            StudyCollaborator.study_id == study.id,
            StudyCollaborator.researcher_id == researcher.id,
        )
    )


def allows(role: str | None, needed: str) -> bool:
    """True when ``role`` is at least ``needed`` (viewer < editor < owner < admin)."""
    return role is not None and LEVELS[role] >= LEVELS[needed]


def may(researcher: Researcher | None, study: Study, needed: str = VIEW) -> bool:
    return allows(study_role(researcher, study), needed)


def _shared_with(researcher: Researcher, roles=COLLABORATOR_ROLES):
    return select(StudyCollaborator.study_id).where(
        StudyCollaborator.researcher_id == researcher.id, StudyCollaborator.role.in_(roles)
    )


def visible_studies(researcher: Researcher) -> Select:
    """SELECT of the studies ``researcher`` may see (all of them for an admin)."""
    query = select(Study)
    if not researcher.is_admin:
        query = query.where(
            or_(Study.owner_id == researcher.id, Study.id.in_(_shared_with(researcher)))
        )
    return query


def usable_sets(researcher: Researcher) -> Select:
    """SELECT of the stimulus sets ``researcher`` may create studies from."""
    query = select(StimulusSet)
    if not researcher.is_admin:
        edited = select(Study.stimulus_set_id).where(
            or_(Study.owner_id == researcher.id, Study.id.in_(_shared_with(researcher, [EDIT])))
        )
        query = query.where(
            or_(StimulusSet.owner_id == researcher.id, StimulusSet.id.in_(edited))
        )
    return query


def may_use_set(researcher: Researcher, set_id: int) -> StimulusSet | None:
    """The stimulus set ``set_id`` if ``researcher`` may use it, else None (also when it
    does not exist: the caller cannot tell the two apart)."""
    return db.session.scalars(usable_sets(researcher).where(StimulusSet.id == set_id)).first()


def share_study(study: Study, email: str, role: str) -> tuple[Researcher, str]:
    """Give the researcher with ``email`` ``role`` on ``study`` (added, or their role
    changed) -> (researcher, "added" | "changed" | "unchanged"). The caller commits."""
    if role not in COLLABORATOR_ROLES:
        raise AccessError(f"role must be one of {list(COLLABORATOR_ROLES)}, not {role!r}")
    researcher = researcher_by_email(email)
    if researcher is None:
        raise AccessError(
            f"there is no researcher account {email.strip()!r}; an admin creates one with "
            f"`pstudy researcher create {email.strip()}`, then share the study again"
        )
    if study.owner_id == researcher.id:
        raise AccessError(f"{researcher.email} owns this study already")
    row = db.session.scalars(
        select(StudyCollaborator).where(
            StudyCollaborator.study_id == study.id,
            StudyCollaborator.researcher_id == researcher.id,
        )
    ).first()
    if row is None:
        db.session.add(StudyCollaborator(study_id=study.id, researcher_id=researcher.id,
                                         role=role))
        db.session.flush()
        return researcher, "added"
    if row.role == role:
        return researcher, "unchanged"
    row.role = role
    db.session.flush()
    return researcher, "changed"


def unshare_study(study: Study, email: str) -> Researcher:
    """Remove the collaborator with ``email`` from ``study``. The caller commits."""
    researcher = researcher_by_email(email)
    row = None
    if researcher is not None:
        row = db.session.scalars(
            select(StudyCollaborator).where(
                StudyCollaborator.study_id == study.id,
                StudyCollaborator.researcher_id == researcher.id,
            )
        ).first()
    if row is None:
        raise AccessError(f"{email.strip()!r} is not a collaborator of this study")
    db.session.delete(row)
    db.session.flush()
    return researcher


def collaborators(study: Study) -> list[tuple[str, str]]:
    """(e-mail, role) of the study's collaborators, by e-mail."""
    rows = db.session.execute(
        select(Researcher.email, StudyCollaborator.role)
        .join(StudyCollaborator, StudyCollaborator.researcher_id == Researcher.id)
        .where(StudyCollaborator.study_id == study.id)
        .order_by(Researcher.email)
    ).all()
    return [(email, role) for email, role in rows]
