"""The study database: typed SQLAlchemy 2.0 models.

Where a vote is stored: :class:`Vote`, one row per answered trial, written at the moment
of the vote (unique per :class:`Trial`, which carries the server-issued token).

Tables, in the order data flows:
``researcher`` → ``researcher_login`` (one row per login, ended at logout),
``login_failure`` (recent wrong passwords, for throttling);
``stimulus_set`` (owned by a researcher) → ``condition``, ``image`` (references), ``stimulus`` (one reconstruction
of one image by one condition); ``study`` (owned by a
researcher) → ``study_collaborator`` (viewers and editors), ``item`` (image × condition pair, the unit that
gets K votes); ``participant`` → ``trial`` (a lease of one item, or a catch / repeat
trial, to one participant) → ``vote``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    cast,
    event,
    false,
    literal,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

from study_app.extensions import db

STUDY_STATUSES = ("draft", "live", "paused", "closed")
COLLABORATOR_ROLES = ("viewer", "editor")
PARTICIPANT_STATUSES = ("started", "completed", "returned")
TRIAL_KINDS = ("main", "catch", "repeat")
TRIAL_STATUSES = ("leased", "answered", "released")
CHOICES = ("left", "right")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timestamp stored as naive UTC and always read back timezone-aware (UTC).

    SQLite has no time zones; storing naive UTC everywhere keeps comparisons in SQL
    (``expires_at > :now``) correct on both databases.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("UTCDateTime needs a timezone-aware datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class Researcher(db.Model):
    """A person who may log in to create and run studies (werkzeug password hash)."""

    __tablename__ = "researcher"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    # An admin sees and may do everything, on every study and stimulus set.
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def set_password(self, password: str) -> None:
        """Store a salted hash of ``password`` (never the password)."""
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        """True when ``password`` matches the stored hash."""
        return check_password_hash(self.password_hash, password)


class ResearcherLogin(db.Model):
    """One login of a researcher. The session cookie carries a random token whose SHA-256
    is stored here; logging out (or a new password) ends the row, so neither a copied
    cookie nor a late response that re-sets the old cookie can bring the session back."""

    __tablename__ = "researcher_login"
    id: Mapped[int] = mapped_column(primary_key=True)
    researcher_id: Mapped[int] = mapped_column(
        ForeignKey("researcher.id", ondelete="CASCADE"), index=True
    )
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class LoginFailure(db.Model):
    """One wrong password (or unknown e-mail) at the login form. Kept in the database so
    that every worker process and host counts the same failures; rows older than the
    throttling window are deleted as new ones come in (see :mod:`study_app.throttle`)."""

    __tablename__ = "login_failure"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(254), index=True)  # as typed, lowercased
    address: Mapped[str] = mapped_column(String(64), index=True)  # the client address
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class StimulusSet(db.Model):
    """An imported stimulus set (contract 1): a folder plus its (possibly inferred) manifest."""

    __tablename__ = "stimulus_set"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    root: Mapped[str] = mapped_column(Text)  # absolute folder path
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    manifest_sha256: Mapped[str] = mapped_column(String(64), index=True)
    manifest_inferred: Mapped[bool] = mapped_column(Boolean, default=False)
    image_height: Mapped[int] = mapped_column(Integer)
    image_width: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The researcher who imported it (None: imported on the command line without --owner;
    # then only admins may use it).
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("researcher.id", ondelete="SET NULL",
                   name="fk_stimulus_set_owner_id_researcher"),
        index=True,
    )

    conditions: Mapped[list[Condition]] = relationship(
        back_populates="stimulus_set", order_by="Condition.name"
    )
    images: Mapped[list[Image]] = relationship(
        back_populates="stimulus_set", order_by="Image.key"
    )


class Condition(db.Model):
    """A method (e.g. the loss an autoencoder was trained with) in a stimulus set."""

    __tablename__ = "condition"
    __table_args__ = (UniqueConstraint("stimulus_set_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    stimulus_set_id: Mapped[int] = mapped_column(ForeignKey("stimulus_set.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # manifest entry

    stimulus_set: Mapped[StimulusSet] = relationship(back_populates="conditions")


class Image(db.Model):
    """A reference image of a stimulus set (``reference/<key>.png``)."""

    __tablename__ = "image"
    __table_args__ = (UniqueConstraint("stimulus_set_id", "key"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    stimulus_set_id: Mapped[int] = mapped_column(ForeignKey("stimulus_set.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(200))  # the image id of contract 1
    path: Mapped[str] = mapped_column(Text)  # relative to the set's root
    sha256: Mapped[str] = mapped_column(String(64), index=True)

    stimulus_set: Mapped[StimulusSet] = relationship(back_populates="images")


class Stimulus(db.Model):
    """One condition's reconstruction of one image (``<condition>/<key>.png``)."""

    __tablename__ = "stimulus"
    __table_args__ = (UniqueConstraint("image_id", "condition_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    stimulus_set_id: Mapped[int] = mapped_column(ForeignKey("stimulus_set.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id", ondelete="CASCADE"))
    condition_id: Mapped[int] = mapped_column(ForeignKey("condition.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    image: Mapped[Image] = relationship()
    condition: Mapped[Condition] = relationship()


class Study(db.Model):
    """A 2AFC study over a stimulus set; ``config`` is the validated StudyConfig as JSON."""

    __tablename__ = "study"
    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(80), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    stimulus_set_id: Mapped[int] = mapped_column(ForeignKey("stimulus_set.id"))
    status: Mapped[str] = mapped_column(String(16), default="draft")
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_sha256: Mapped[str] = mapped_column(String(64))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("researcher.id"))
    # The owner may share the study (study_collaborator); None: only admins see it.
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("researcher.id", ondelete="SET NULL", name="fk_study_owner_id_researcher"),
        index=True,
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Active design: when the stopping rule stopped issuing main trials, and why (set once).
    main_closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    main_closed_reason: Mapped[str | None] = mapped_column(String(400))

    stimulus_set: Mapped[StimulusSet] = relationship()
    created_by: Mapped[Researcher | None] = relationship(foreign_keys=[created_by_id])
    owner: Mapped[Researcher | None] = relationship(foreign_keys=[owner_id])
    collaborators: Mapped[list[StudyCollaborator]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True,
        order_by="StudyCollaborator.id",
    )


class StudyCollaborator(db.Model):
    """A researcher the owner shared a study with: ``viewer`` (dashboard, downloads,
    preview) or ``editor`` (also start / pause / close)."""

    __tablename__ = "study_collaborator"
    __table_args__ = (UniqueConstraint("study_id", "researcher_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    researcher_id: Mapped[int] = mapped_column(
        ForeignKey("researcher.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    study: Mapped[Study] = relationship(back_populates="collaborators")
    researcher: Mapped[Researcher] = relationship()


# Items' draw keys: (id × DRAW_MULT) mod DRAW_MOD, a fixed pseudo-random order over item ids
# (Knuth's multiplicative hash; the modulus is the prime just above 2**32).
DRAW_MULT = 2654435761
DRAW_MOD = 4294967311


def draw_key_sql(item_id):
    """SQL: the draw key of ``item_id`` (an integer column or expression), on both databases."""
    big = cast(item_id, BigInteger)
    return (big * literal(DRAW_MULT, BigInteger)) % literal(DRAW_MOD, BigInteger)


class Item(db.Model):
    """An image × unordered condition pair (``condition_a`` < ``condition_b`` by name).

    ``n_votes`` counts answered main trials, ``n_a_left`` those of them that showed
    condition a on the left and ``n_a_wins`` those (2afc) that chose condition a; all
    change only under this row's lock, and triggers keep :class:`PairTally` in step. ``draw_key`` is a
    fixed pseudo-random key in [0, 4294967311) (``(id × 2654435761) mod 4294967311``):
    scheduling breaks load ties by reading the items in key order from a random start,
    over the indexes below, instead of ordering every eligible item (docs/study_api.md).
    """

    __tablename__ = "item"
    __table_args__ = (
        UniqueConstraint("study_id", "image_id", "condition_a_id", "condition_b_id"),
        # the lowest-load items of a study / of one pair, in draw order (scheduling)
        Index("ix_item_study_load", "study_id", "n_votes", "draw_key"),
        Index("ix_item_study_pair_load", "study_id", "condition_a_id", "condition_b_id",
              "n_votes", "draw_key"),
        Index("ix_item_study_draw", "study_id", "draw_key"),  # a random item (catch trials)
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id"))
    condition_a_id: Mapped[int] = mapped_column(ForeignKey("condition.id"))
    condition_b_id: Mapped[int] = mapped_column(ForeignKey("condition.id"))
    n_votes: Mapped[int] = mapped_column(Integer, default=0)
    n_a_left: Mapped[int] = mapped_column(Integer, default=0)
    n_a_wins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    draw_key: Mapped[int] = mapped_column(BigInteger, default=0)

    image: Mapped[Image] = relationship()
    condition_a: Mapped[Condition] = relationship(foreign_keys=[condition_a_id])
    condition_b: Mapped[Condition] = relationship(foreign_keys=[condition_b_id])


class PairTally(db.Model):
    """Per study, condition pair (as the items store it) and vote level: how many of the
    pair's items hold exactly ``n_votes`` votes (``n_items``) and how many of those items'
    votes chose condition a (``a_wins``).

    Made with the study's items by :func:`study_app.studies.create_study` (one grouped
    insert: every item at level 0), then kept by database triggers on ``item`` (delete,
    and any update of ``n_votes`` or ``n_a_wins``: the item leaves its old level's row and
    joins its new one), so every path that counts a vote keeps it exact, in the vote's own
    transaction. (Not a trigger per inserted item: on PostgreSQL that updated each row once
    per item, and the dead row versions of a 240 000-item study made every read of the
    table slow until a vacuum.) The active design reads its per-pair counts and its win
    matrix here: pairs × levels rows instead of every item and every vote of the study.
    Rows whose ``n_items`` fell to 0 stay."""

    __tablename__ = "pair_tally"
    study_id: Mapped[int] = mapped_column(
        ForeignKey("study.id", ondelete="CASCADE"), primary_key=True)
    condition_a_id: Mapped[int] = mapped_column(ForeignKey("condition.id"), primary_key=True)
    condition_b_id: Mapped[int] = mapped_column(ForeignKey("condition.id"), primary_key=True)
    n_votes: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    a_wins: Mapped[int] = mapped_column(Integer, default=0)


# The triggers behind PairTally (migration 0009 creates the same; a migration keeps its own
# copy). An item's move lands on its old level's row first, then its new one (ascending
# levels as votes only add), so concurrent votes of a pair lock the rows in one order.
_TALLY_KEY = ("study_id = {row}.study_id AND condition_a_id = {row}.condition_a_id "
              "AND condition_b_id = {row}.condition_b_id AND n_votes = {row}.n_votes")
_TALLY_JOIN_SQLITE = (
    "INSERT OR IGNORE INTO pair_tally (study_id, condition_a_id, condition_b_id, n_votes, "
    "n_items, a_wins) VALUES (NEW.study_id, NEW.condition_a_id, NEW.condition_b_id, "
    "NEW.n_votes, 0, 0); UPDATE pair_tally SET n_items = n_items + 1, "
    "a_wins = a_wins + NEW.n_a_wins WHERE " + _TALLY_KEY.format(row="NEW") + ";")
_TALLY_LEAVE_SQLITE = ("UPDATE pair_tally SET n_items = n_items - 1, a_wins = a_wins - "
                       "OLD.n_a_wins WHERE " + _TALLY_KEY.format(row="OLD") + ";")
PAIR_TALLY_TRIGGERS_SQLITE = (
    "CREATE TRIGGER tr_item_tally_update AFTER UPDATE OF n_votes, n_a_wins ON item BEGIN "
    + _TALLY_LEAVE_SQLITE + " " + _TALLY_JOIN_SQLITE + " END",
    "CREATE TRIGGER tr_item_tally_delete AFTER DELETE ON item BEGIN "
    + _TALLY_LEAVE_SQLITE + " END",
)
PAIR_TALLY_TRIGGERS_POSTGRESQL = (
    """CREATE FUNCTION item_pair_tally() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pair_tally SET n_items = n_items - 1, a_wins = a_wins - OLD.n_a_wins
    WHERE """ + _TALLY_KEY.format(row="OLD") + """;
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
PAIR_TALLY_TRIGGER_NAMES = {
    "sqlite": {"tr_item_tally_update", "tr_item_tally_delete"},
    "postgresql": {"tr_item_pair_tally"},
}
# db.create_all() makes them with the item table (their bodies name pair_tally, which is
# looked up when they fire)
for _statement in PAIR_TALLY_TRIGGERS_SQLITE:
    event.listen(Item.__table__, "after_create", DDL(_statement).execute_if(dialect="sqlite"))
for _statement in PAIR_TALLY_TRIGGERS_POSTGRESQL:
    event.listen(Item.__table__, "after_create", DDL(_statement).execute_if(dialect="postgresql"))


class Participant(db.Model):
    """One person taking one study; ``token`` authenticates their API calls.

    Prolific's ``PROLIFIC_PID`` is unique per study, so the same link resumes the same
    participant. ``public_id`` is the anonymous id that appears in exports.
    """

    __tablename__ = "participant"
    __table_args__ = (UniqueConstraint("study_id", "prolific_pid"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    prolific_pid: Mapped[str | None] = mapped_column(String(64))
    prolific_study_id: Mapped[str | None] = mapped_column(String(64))
    prolific_session_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="started")
    preview: Mapped[bool] = mapped_column(Boolean, default=False)
    n_answered: Mapped[int] = mapped_column(Integer, default=0)
    n_issued: Mapped[int] = mapped_column(Integer, default=0)  # trials ever leased
    user_agent: Mapped[str | None] = mapped_column(String(400))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The display check before the trials (study_app.calibration), its latest report:
    # status "passed" / "failed" (None: never reported), how many reports were sent.
    display_status: Mapped[str | None] = mapped_column(String(8))
    display_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    display_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    display_dpr: Mapped[float | None] = mapped_column(Float)  # window.devicePixelRatio
    display_screen_w: Mapped[int | None] = mapped_column(Integer)  # screen.width, CSS px
    display_screen_h: Mapped[int | None] = mapped_column(Integer)
    display_zoom: Mapped[float | None] = mapped_column(Float)  # browser zoom estimate, 1 = 100 %
    display_scaling_ok: Mapped[bool | None] = mapped_column(Boolean)
    # Card (CSS px/mm) and blind-spot (viewing distance, CSS px/deg) calibration; None:
    # that step was skipped or not offered.
    card_width_px: Mapped[float | None] = mapped_column(Float)
    px_per_mm: Mapped[float | None] = mapped_column(Float)
    blind_spot_px: Mapped[float | None] = mapped_column(Float)
    viewing_distance_mm: Mapped[float | None] = mapped_column(Float)
    px_per_deg: Mapped[float | None] = mapped_column(Float)

    study: Mapped[Study] = relationship()


class Trial(db.Model):
    """A trial issued to a participant, identified by its server-issued ``token``.

    ``status``: ``leased`` (open until ``expires_at``), ``answered`` (has a Vote), or
    ``released`` (returned to the pool: the participant finished or withdrew). A lease
    whose ``expires_at`` has passed counts as returned to the pool as well.
    """

    __tablename__ = "trial"
    __table_args__ = (
        Index("ix_trial_item_status", "item_id", "status"),
        Index("ix_trial_participant_status", "participant_id", "status"),
        Index("ix_trial_study_open", "study_id", "status", "expires_at"),  # a study's leases
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"))
    participant_id: Mapped[int] = mapped_column(ForeignKey("participant.id", ondelete="CASCADE"))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("item.id"))
    kind: Mapped[str] = mapped_column(String(8))
    image_id: Mapped[int] = mapped_column(ForeignKey("image.id"))
    condition_left: Mapped[str] = mapped_column(String(200))
    condition_right: Mapped[str] = mapped_column(String(200))
    left_sha256: Mapped[str] = mapped_column(String(64))
    right_sha256: Mapped[str] = mapped_column(String(64))
    expected_condition: Mapped[str | None] = mapped_column(String(200))
    a_left: Mapped[bool | None] = mapped_column(Boolean)  # main: condition a shown left
    repeat_of_id: Mapped[int | None] = mapped_column(ForeignKey("trial.id"))
    preview: Mapped[bool] = mapped_column(Boolean, default=False)
    sequence: Mapped[int] = mapped_column(Integer)  # issue order within the participant
    status: Mapped[str] = mapped_column(String(10), default="leased")
    leased_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Active design: the pair's expected information gain (bits) when it was chosen.
    info_gain: Mapped[float | None] = mapped_column(Float)

    participant: Mapped[Participant] = relationship()
    image: Mapped[Image] = relationship()
    item: Mapped[Item | None] = relationship()


class StudyPosterior(db.Model):
    """An active study's condition-scale posterior (``analysis.active.Posterior`` as JSON:
    Thurstone MAP ``mean`` in JOD, covariance ``cov``), recomputed from the votes at most
    every ``posterior_every`` votes and shared by every server process."""

    __tablename__ = "study_posterior"
    study_id: Mapped[int] = mapped_column(
        ForeignKey("study.id", ondelete="CASCADE"), primary_key=True)
    n_votes: Mapped[int] = mapped_column(Integer)
    conditions: Mapped[list[Any]] = mapped_column(JSON)  # condition ids, the scale's order
    posterior: Mapped[dict[str, Any]] = mapped_column(JSON)
    computed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Vote(db.Model):
    """One answered trial: the row the export reads (exactly one per trial)."""

    __tablename__ = "vote"
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trial.id", ondelete="CASCADE"), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    participant_id: Mapped[int] = mapped_column(ForeignKey("participant.id", ondelete="CASCADE"))
    trial_index: Mapped[int] = mapped_column(Integer)  # 0-based answer order
    # 2afc: "left" | "right" (sequential: first | second); jnd: "same" | "different"
    choice: Mapped[str] = mapped_column(String(9))
    # 2afc: the chosen image's condition; jnd: the answer again (so catch and repeat
    # checks compare one column for both tasks)
    chosen_condition: Mapped[str] = mapped_column(String(200))
    rt_ms: Mapped[float] = mapped_column(Float)
    presented_at: Mapped[datetime] = mapped_column(UTCDateTime)
    answered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    reference_shown: Mapped[bool] = mapped_column(Boolean)
    viewport_w: Mapped[int] = mapped_column(Integer)
    viewport_h: Mapped[int] = mapped_column(Integer)
    device_pixel_ratio: Mapped[float] = mapped_column(Float)
    # Frame-timed limited exposure (docs/participant_pages.md); all null without one.
    exposure_requested_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    frame_period_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    exposure_frames_requested: Mapped[int | None] = mapped_column(Integer, nullable=True)
    exposure_onset_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    exposure_offset_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    exposure_frames_measured: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Sequential presentation: the exposure fields above time the first image; these the
    # interval (requested) and the second image (all null for side-by-side trials).
    isi_requested_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    second_requested_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    second_frames_requested: Mapped[int | None] = mapped_column(Integer, nullable=True)
    second_onset_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    second_offset_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    second_frames_measured: Mapped[int | None] = mapped_column(Integer, nullable=True)

    trial: Mapped[Trial] = relationship()
