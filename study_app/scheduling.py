"""Balanced per-item scheduling, exactly-once votes, finishing: the study's core rules.

Every function here runs inside :func:`study_app.transactions.run_write` (one write
transaction of the ORM session), except the vote's fast paths, which get a Core
connection from :func:`study_app.transactions.run_on_connection`. The rules (docs/study_api.md):

- an item (image × condition pair) has a *load* = its votes + its open leases (leased,
  not expired, not preview); a participant's main trials are drawn from the items with
  the lowest load below K, never an item this participant was ever issued;
  ties are broken by a seeded pseudo-random order (the items' draw keys read from a
  random start); :func:`_lowest_load` finds them over indexes, level by level, without
  reading every item;
- on PostgreSQL the candidate items are locked ``FOR UPDATE SKIP LOCKED`` (two
  participants never lease the same item concurrently) and their load is re-read after
  the lock; on SQLite ``BEGIN IMMEDIATE`` makes the whole transaction the only writer;
- sides: condition a goes left when fewer of the item's votes + open leases showed it
  left (ties: random), so each side order gets about K/2;
- a vote locks the participant, then the item, then the trial; a trial that is already
  answered returns the stored vote (same answer), a different choice is a conflict; the
  common case (a fresh vote on an open lease) takes a fast path: on SQLite five
  statements on the driver connection (:func:`record_vote_sqlite`), on PostgreSQL one
  statement in autocommit (:func:`record_vote_postgresql`);
- a lease that expires returns the item to the pool (it simply stops counting); a vote
  on it is refused (410), so no item ever gets more than K votes. Asking for the next
  trials renews the participant's open leases (the page asks at about every trial), so
  only a page that stopped asking loses its trials;
- *when* a lease expired is decided by the time read once the deciding transaction holds
  its locks (:func:`write_time`), never by a time taken before it waited for them: on
  SQLite after ``BEGIN IMMEDIATE`` (this host's clock; one writer at a time), on
  PostgreSQL the server's ``clock_timestamp()`` (one clock for every host) after the
  item's row lock. Every decision about a lease (a vote accepted, a lease renewed, an
  item's load re-read before leasing it again) is made under the item's lock, so the
  decisions are ordered by that lock and their times by the same order: a vote that
  waited for the lock while its lease ran out is refused, and an item is never leased
  again while a vote on it can still be accepted.

Lock order: participant → item(s) → trial, which rules out deadlocks between scheduling
and voting. The PostgreSQL fast path locks participant and trial in its read, then the
item; every path that touches a participant's trials holds that participant's lock first,
so no cycle can form (and a deadlock, were one detected, is retried).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache

from sqlalchemy import (
    BigInteger,
    and_,
    bindparam,
    cast,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import make_transient_to_detached

from study_app.errors import ApiError
from study_app.extensions import db, read
from study_app.models import (
    DRAW_MOD,
    Condition,
    Image,
    Item,
    Participant,
    Stimulus,
    Study,
    Trial,
    Vote,
    utcnow,
)
from study_app.studies import REFERENCE_QUESTION_MODE, StudyConfig

KINDS = ("main", "catch", "repeat")
REFERENCE = "reference"


@dataclass(frozen=True)
class VoteInput:
    """A validated vote request (see ``api.parse_vote``); times are aware UTC datetimes."""

    trial_token: str
    choice: str  # 2afc: "left" | "right" (first | second); jnd: "same" | "different"
    rt_ms: float
    presented_at: datetime
    answered_at: datetime
    viewport_w: int
    viewport_h: int
    device_pixel_ratio: float
    timing: ExposureTiming | None = None  # frame-timed limited exposure, if any
    sequence: SequenceTiming | None = None  # sequential: the interval and second image

    @property
    def task(self) -> str:
        """The task this answer belongs to ("2afc" or "jnd"), from its choice."""
        return "jnd" if self.choice in JND_ANSWERS else "2afc"


@dataclass(frozen=True)
class ExposureTiming:
    """How a limited exposure was shown (validated by ``api.parse_timing``).

    Times in milliseconds; onset and offset are ``requestAnimationFrame`` timestamps on
    the page's ``performance.now()`` clock (ms since the page's time origin).
    """

    exposure_requested_ms: float
    frame_period_ms: float
    exposure_frames_requested: int
    exposure_onset_ms: float
    exposure_offset_ms: float
    exposure_frames_measured: int

    def columns(self) -> dict[str, float | int]:
        """The ``vote`` columns of this timing, by name."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class SequenceTiming:
    """The rest of a sequential trial's timing (validated by ``api.parse_sequence``): the
    requested inter-stimulus interval and the second image, as :class:`ExposureTiming`
    times the first (ms; rAF timestamps on the page's ``performance.now()`` clock).
    The measured interval is ``second_onset_ms - exposure_offset_ms``."""

    isi_requested_ms: float
    second_requested_ms: float
    second_frames_requested: int
    second_onset_ms: float
    second_offset_ms: float
    second_frames_measured: int


TIMING_FIELDS = tuple(ExposureTiming.__dataclass_fields__)
SEQUENCE_FIELDS = tuple(SequenceTiming.__dataclass_fields__)
# the columns of a vote without frame timing / without a sequential presentation
NO_TIMING = dict.fromkeys(TIMING_FIELDS + SEQUENCE_FIELDS)
CHOICES = ("left", "right")  # 2afc (a sequential trial: left = first, right = second)
JND_ANSWERS = ("same", "different")
JND_CATCH_EXPECTED = "same"  # a JND catch trial shows the reference twice


@dataclass(frozen=True)
class Progress:
    answered: int
    total: int


def planned_total(config: StudyConfig) -> int:
    """Trials a participant answers when nothing runs out: M main + catch + repeat."""
    return config.trials_per_participant + config.catch_trials + config.repeat_trials


# The fetch path's statements are built once per process (functools.cache; the flags
# pick a variant) with every value a bind parameter, and column reads run on the session's
# connection (extensions.read): building a statement and running it through the ORM
# session cost more Python than the database's own work for these index reads. Bind
# names: study_id, participant_id, k (votes per item), now, pair_a, pair_b, level,
# start, limit, exclude / ids (lists).


def open_lease():
    """SQL: the current ``Trial`` is an open lease at ``now`` (bind)."""
    return and_(Trial.status == "leased", Trial.expires_at > bindparam("now"))


def open_main_lease():
    """SQL: the current ``Trial`` is an open main lease of a participant, not a preview
    (what counts toward an item's load; bind ``now``)."""
    return and_(Trial.kind == "main", Trial.preview.is_(False), open_lease())


def _live_or_answered():
    return or_(Trial.status == "answered", open_lease())


@cache
def _open_leases_of_item():
    """SQL: the open non-preview main leases of the current ``Item`` row (bind ``now``)."""
    return (
        select(func.count(Trial.id))
        .where(Trial.item_id == Item.id, open_main_lease())
        .correlate(Item)
        .scalar_subquery()
    )


def item_load():
    """SQL expression: votes + open non-preview main leases of the current ``Item`` row
    (bind ``now``)."""
    return Item.n_votes + _open_leases_of_item()


def _draw_rank(start: int):
    """SQL: the current ``Item``'s place in draw order read from ``start`` (a rotation of
    the fixed draw-key order; ``start`` in [1, DRAW_MOD))."""
    return (cast(Item.draw_key, BigInteger) + literal(DRAW_MOD - start, BigInteger)) % literal(
        DRAW_MOD, BigInteger)


@cache
def issued_item_ids():
    """SQL: the item ids ever issued to the participant (bind ``participant_id``) as main
    trials, in any state."""
    return select(Trial.item_id).where(
        Trial.participant_id == bindparam("participant_id"), Trial.kind == "main",
        Trial.item_id.is_not(None))


@cache
def _unleased_free_items(pair: bool = False, exclude: bool = False, suffix: str = ""):
    """SQL: ``(id, n_votes, draw_key)`` of the study's items with no open lease (so their
    load is ``n_votes``), under K and never issued to the participant; ``pair``: only the
    items of pair (``pair_a``, ``pair_b``); ``exclude``: not the ids in ``exclude``. Read
    over index ix_item_study_load / ix_item_study_pair_load, so a ``LIMIT`` stops after
    about as many rows as it returns. ``suffix``: appended to the pair's bind names (one
    statement that reads several pairs)."""
    # no open lease, as a count per item rather than NOT EXISTS: PostgreSQL turns NOT EXISTS
    # into an anti join whose plan follows the table statistics, and with those of a young
    # trial table (not yet analyzed) it joined every open lease of the study to every item
    # read (0.6 ms per read at 360 leases, growing with them); a scalar subquery is one
    # index lookup (ix_trial_item_status) per item read, whatever the statistics say
    query = select(Item.id, Item.n_votes, Item.draw_key).where(
        Item.study_id == bindparam("study_id"), Item.n_votes < bindparam("k"),
        Item.id.not_in(issued_item_ids()), _open_leases_of_item() == 0)
    if pair:
        query = query.where(Item.condition_a_id == bindparam(f"pair_a{suffix}"),
                            Item.condition_b_id == bindparam(f"pair_b{suffix}"))
    if exclude:
        query = query.where(Item.id.not_in(bindparam("exclude", expanding=True)))
    return query


@cache
def _lowest_level_above(pair: bool, exclude: bool):
    """SQL: the lowest vote level above ``level`` that holds such an item (one seek)."""
    return (_unleased_free_items(pair, exclude).where(Item.n_votes > bindparam("level"))
            .order_by(Item.n_votes).limit(1))


@cache
def _at_level(pair: bool, exclude: bool, wrapped: bool, suffix: str = ""):
    """SQL: up to ``limit`` such items at vote level ``level`` in draw-key order, from
    ``start`` on (``wrapped``: the ones before ``start``); ``suffix``: on the bind names
    of the pair, the level, the start and the limit."""
    start = bindparam(f"start{suffix}")
    part = Item.draw_key < start if wrapped else Item.draw_key >= start
    return (_unleased_free_items(pair, exclude, suffix)
            .where(Item.n_votes == bindparam(f"level{suffix}"), part)
            .order_by(Item.draw_key).limit(bindparam(f"limit{suffix}")))


@cache
def _first_reads(pairs: int):
    """SQL, one statement for ``pairs`` pairs: what :func:`_at_level` reads first for each
    (its level from ``start``), binds suffixed ``_0``, ``_1``, ..., each row led by the
    pair's index."""
    branches = []
    for r in range(pairs):
        rows = _at_level(True, False, False, f"_{r}").subquery()
        branches.append(select(literal(r), rows.c.id, rows.c.n_votes, rows.c.draw_key))
    return union_all(*branches)


def _read_first_levels(participant: Participant, study: Study, config: StudyConfig,
                       now: datetime, wanted: list[tuple[tuple[int, int], int, int, int]]
                       ) -> list[list[tuple[int, int, int]]]:
    """For each ``(pair, want, start, level)``: the first read of :func:`_lowest_load`
    with ``from_level=level`` (up to ``want`` rows ``(id, n_votes, draw_key)``), all of
    them in one statement (a fetch's pairs: one round trip instead of one each)."""
    params = _free_params(participant, study, config, now)
    for r, ((a, b), want, start, level) in enumerate(wanted):
        params.update({f"pair_a_{r}": a, f"pair_b_{r}": b, f"level_{r}": level,
                       f"start_{r}": start, f"limit_{r}": want})
    found: list[list[tuple[int, int, int]]] = [[] for _ in wanted]
    for r, item_id, votes, key in read(_first_reads(len(wanted)), params).all():
        found[r].append((item_id, votes, key))
    for rows in found:  # in draw-key order from the start, as the read of one pair gives
        rows.sort(key=lambda row: row[2])
    return found


@cache
def _leased_free_items_query():
    load = Item.n_votes + func.count(Trial.id)
    return (
        select(Item.id, load, Item.draw_key, Item.condition_a_id, Item.condition_b_id)
        .join(Trial, Trial.item_id == Item.id)
        .where(Trial.study_id == bindparam("study_id"), open_main_lease(),
               Item.id.not_in(issued_item_ids()))
        .group_by(Item.id, Item.n_votes, Item.draw_key, Item.condition_a_id,
                  Item.condition_b_id)
        .having(load < bindparam("k"))
    )


def _free_params(participant: Participant, study: Study, config: StudyConfig,
                 now: datetime) -> dict:
    """The bind values of the free-item reads for ``participant`` at ``now``."""
    return {"study_id": study.id, "participant_id": participant.id,
            "k": config.votes_per_item, "now": now}


Leased = list | Callable[[], list] | None
"""The study's leased items free for the participant (:func:`_leased_free_items`'s rows):
the rows, a function that reads them once when first called (a fetch needs them only when
the unleased items do not settle it), or None to read them at the point of use."""


def _leased_rows(leased: Leased, participant: Participant, study: Study,
                 config: StudyConfig, now: datetime) -> list:
    if leased is None:
        return _leased_free_items(participant, study, config, now)
    return leased() if callable(leased) else leased


def _leased_free_items(participant: Participant, study: Study, config: StudyConfig,
                       now: datetime) -> list[tuple[int, int, int, tuple[int, int]]]:
    """``(id, load, draw_key, pair)`` of the study's items that have open leases, load < K,
    never issued to the participant (one grouped read of the study's open leases, over
    index ix_trial_study_open: as many rows as there are open leases, not items)."""
    rows = read(_leased_free_items_query(),
                _free_params(participant, study, config, now)).all()
    return [(i, int(n), int(k), (a, b)) for i, n, k, a, b in rows]


@cache
def _count_unleased():
    # in load order, so PostgreSQL reads index ix_item_study_load (a sequential scan, its
    # plan for an unordered LIMIT, read ~570 pages to count 16 items of a new study)
    return select(func.count()).select_from(
        _unleased_free_items().order_by(Item.n_votes).limit(bindparam("limit")).subquery())


def _count_free(participant: Participant, study: Study, config: StudyConfig, now: datetime,
                limit: int, leased: Leased = None) -> int:
    """How many items the participant may still get (load < K, never issued), counted
    up to ``limit``: the scan stops after ``limit`` unleased items (and the leased ones
    are not read when those reach it). ``leased``: see :data:`Leased`."""
    params = _free_params(participant, study, config, now)
    unleased = read(_count_unleased(), dict(params, limit=limit)).scalar() or 0
    if unleased >= limit:
        return limit
    return min(limit, unleased + len(_leased_rows(leased, participant, study, config, now)))


def _lowest_load(participant: Participant, study: Study, config: StudyConfig, now: datetime,
                 want: int, start: int, pair: tuple[int, int] | None = None,
                 exclude: list[int] = (), leased: Leased = None,
                 from_level: int | None = None, first: list | None = None) -> list[int]:
    """The ids of up to ``want`` free items in scheduling order: lowest load first, ties in
    draw-key order read from ``start`` (what ordering every eligible item by ``(load,
    (draw_key - start) mod DRAW_MOD)`` gives, without reading them all).

    Items without an open lease have load = votes: read level by level over the load
    index, each level from ``start`` then wrapping around, ``want`` rows at most; items
    with open leases (a few per participant online) are read with their loads and merged
    (``leased``: see :data:`Leased`; not read when ``want`` unleased items at load 0 are
    found: an item with an open lease has load 1 or more, so none could come before them).
    ``from_level``: a level no free item is below (e.g. from the pair tallies), so the
    walk starts there without first seeking the lowest level; ``first``: the rows of the
    walk's first read (level ``from_level`` from ``start``), if already read
    (:func:`_read_first_levels`)."""
    params = _free_params(participant, study, config, now)
    variant = (pair is not None, bool(exclude))
    if pair is not None:
        params.update(pair_a=pair[0], pair_b=pair[1])
    if exclude:
        params["exclude"] = list(exclude)
    found: list[tuple[int, int, int]] = []

    # the levels that hold such items, lowest first, each found by one index seek (not
    # every level up to K: with K = 10⁶ and too few items that walk never ended)
    def lowest_level_above(level: int) -> int | None:
        row = read(_lowest_level_above(*variant), dict(params, level=level)).first()
        return None if row is None else row.n_votes

    level = lowest_level_above(-1) if from_level is None else from_level
    while level is not None and len(found) < want:
        for wrapped in (False, True):
            if first is not None and not wrapped and level == from_level:
                found += first
                first = None
            else:
                found += read(_at_level(*variant, wrapped), dict(
                    params, level=level, start=start, limit=want - len(found))).all()
            if len(found) >= want:
                break
        if len(found) < want:
            level = lowest_level_above(level)
    if len(found) < want or max(row[1] for row in found) > 0:  # else none leased comes first
        skip = set(exclude)
        found += [row for row in _leased_rows(leased, participant, study, config, now)
                  if row[0] not in skip and (pair is None or row[3] == tuple(pair))]
    found.sort(key=lambda row: (row[1], (row[2] - start) % DRAW_MOD))
    # Once each: on PostgreSQL the two reads see different commits, so an item leased in
    # between is in both (its lower load first; the lease re-checks it under its lock).
    return list(dict.fromkeys(row[0] for row in found))[:want]


def write_time() -> datetime:
    """The time that decides lease expiry in this write transaction (aware UTC).

    Call it once the transaction holds the locks it decides under. PostgreSQL: the
    server's ``clock_timestamp()`` (the time now, not the transaction's start), so hosts
    with different clocks agree; SQLite: this host's clock, read inside ``BEGIN
    IMMEDIATE`` (the only writer until it commits).
    """
    if db.session.get_bind().dialect.name == "postgresql":
        return db.session.execute(text("SELECT clock_timestamp()")).scalar_one().astimezone(UTC)
    return utcnow()


def _lock_leased_items(participant: Participant) -> None:
    """Lock (in id order) the items of the participant's leased main trials, so that
    renewing or judging those leases is ordered with every vote and lease on the items.
    (SQLite: nothing to do, the write transaction is the only writer.)"""
    if db.session.get_bind().dialect.name == "sqlite":
        return
    read(_lock_leased_items_query(), {"participant_id": participant.id})


@cache
def _lock_leased_items_query():
    leased = select(Trial.item_id).where(
        Trial.participant_id == bindparam("participant_id"), Trial.status == "leased",
        Trial.kind == "main", Trial.item_id.is_not(None))
    return select(Item.id).where(Item.id.in_(leased)).order_by(Item.id).with_for_update()


@cache
def _participant_locked():
    return (select(Participant).where(Participant.id == bindparam("participant_id"))
            .with_for_update().execution_options(populate_existing=True))


def lock_participant(participant_id: int) -> Participant:
    """The participant row, locked for this transaction (PostgreSQL ``FOR UPDATE``)."""
    return db.session.execute(
        _participant_locked(), {"participant_id": participant_id}).scalar_one()


@cache
def _preview_items(exclude: bool = False, pair: bool = False):
    """A preview may get any item it was not issued yet (no quota: previews never count);
    binds ``study_id``, ``participant_id`` (and ``exclude``, ``pair_a``/``pair_b``)."""
    query = select(Item).where(Item.study_id == bindparam("study_id"),
                               Item.id.not_in(issued_item_ids()))
    if exclude:
        query = query.where(Item.id.not_in(bindparam("exclude", expanding=True)))
    if pair:
        query = query.where(Item.condition_a_id == bindparam("pair_a"),
                            Item.condition_b_id == bindparam("pair_b"))
    return query


@cache
def _repeat_candidates_query():
    repeated = select(Trial.repeat_of_id).where(
        Trial.participant_id == bindparam("participant_id"), Trial.kind == "repeat",
        Trial.repeat_of_id.is_not(None), _live_or_answered(),
    )
    return select(Trial).where(
        Trial.participant_id == bindparam("participant_id"), Trial.kind == "main",
        Trial.status == "answered", Trial.id.not_in(repeated),
    ).order_by(Trial.sequence)


def _repeat_candidates(participant: Participant, now: datetime) -> list[Trial]:
    return list(db.session.scalars(
        _repeat_candidates_query(), {"participant_id": participant.id, "now": now}))


@cache
def _usage_query():
    return select(Trial.kind, func.count(Trial.id)).where(
        Trial.participant_id == bindparam("participant_id"), _live_or_answered()
    ).group_by(Trial.kind)


def _usage(participant: Participant, now: datetime) -> dict[str, int]:
    rows = read(_usage_query(), {"participant_id": participant.id, "now": now}).all()
    usage = dict.fromkeys(KINDS, 0)
    usage.update({kind: count for kind, count in rows})
    return usage


def remaining_trials(participant: Participant, study: Study, config: StudyConfig,
                     now: datetime, leased: Leased = None) -> dict[str, int]:
    """How many more trials of each kind could be issued to ``participant`` now
    (``leased``: see :data:`Leased`)."""
    if study.status != "live" and not participant.preview:
        return dict.fromkeys(KINDS, 0)
    usage = _usage(participant, now)
    if study.main_closed_at is not None and not participant.preview:
        usage["main"] = config.trials_per_participant  # the stopping rule closed main trials
    wanted = config.trials_per_participant - usage["main"]
    if wanted <= 0:
        eligible = 0
    elif participant.preview:
        eligible = db.session.scalar(
            select(func.count()).select_from(_preview_items().subquery()),
            {"study_id": study.id, "participant_id": participant.id})
    else:
        eligible = _count_free(participant, study, config, now, wanted, leased)
    repeats_left = config.repeat_trials - usage["repeat"]
    return {
        "main": max(0, min(wanted, eligible or 0)),
        "catch": max(0, config.catch_trials - usage["catch"]),
        "repeat": max(0, min(repeats_left, len(_repeat_candidates(participant, now))))
        if repeats_left > 0 else 0,  # (no read when none may be issued)
    }


def draw_kinds(n: int, remaining: dict[str, int], rng: random.Random) -> list[str]:
    """``n`` trial kinds drawn without replacement, weighted by what remains (pure)."""
    left = dict(remaining)
    kinds: list[str] = []
    for _ in range(n):
        pool = [k for k in KINDS if left.get(k, 0) > 0]
        if not pool:
            break
        kind = rng.choices(pool, weights=[left[k] for k in pool])[0]
        left[kind] -= 1
        kinds.append(kind)
    return kinds


def choose_a_left(a_left: int, b_left: int, rng: random.Random) -> bool:
    """Show condition a on the left when it was shown left less often (ties: random)."""
    if a_left != b_left:
        return a_left < b_left
    return rng.random() < 0.5


def _lease_items(participant: Participant, study: Study, config: StudyConfig, now: datetime,
                 n: int, rng: random.Random, pair: tuple[int, int] | None = None,
                 exclude: list[int] = (), leased: Leased = None,
                 sides: dict | None = None) -> list[Item]:
    """Lock up to ``n`` lowest-load eligible items (SKIP LOCKED) and re-check their load;
    ``pair`` (condition ids, as the items store it): only that pair's items; ``exclude``:
    item ids to skip; ``sides``: as :func:`_lock_fresh`. Ties are broken in draw-key
    order from a random start."""
    if n <= 0:
        return []
    start = rng.randrange(1, DRAW_MOD)
    if participant.preview:
        query = _preview_items(bool(exclude), pair is not None)
        params = {"study_id": study.id, "participant_id": participant.id, "now": now,
                  "exclude": list(exclude)}
        if pair is not None:
            params.update(pair_a=pair[0], pair_b=pair[1])
        return list(db.session.scalars(
            query.order_by(item_load(), _draw_rank(start)).limit(n), params))
    # Twice as many candidates as needed: one locked by a concurrent transaction is
    # skipped and the next one taken.
    candidates = _lowest_load(participant, study, config, now, 2 * n, start, pair, exclude,
                              leased)
    return _lock_fresh([(candidates, n)], config, now, sides)[0]


def _lock_fresh(groups: list[tuple[list[int], int]], config: StudyConfig, now: datetime,
                sides: dict | None = None) -> list[list[Item]]:
    """For each ``(candidate ids, n)``: lock up to ``n`` of the candidates, in their order
    (SKIP LOCKED: one held by a concurrent transaction is passed over for the next), then
    re-read the loads under the locks and keep the items still under K. One locking
    statement per round for every group, one re-read for all. ``sides``: filled with
    :func:`_open_sides` of the locked items (what :func:`_side_counts` needs of them)."""
    chosen: list[list[Item]] = [[] for _ in groups]
    tried = [0] * len(groups)
    while True:
        batches = []
        for g, (candidates, n) in enumerate(groups):
            batch = candidates[tried[g]:tried[g] + max(0, n - len(chosen[g]))]
            tried[g] += len(batch)
            batches.append(batch)
        wanted = [i for batch in batches for i in batch]
        if not wanted:
            break
        got = {item.id: item for item in db.session.scalars(_lock_items(), {"ids": wanted})}
        for g, batch in enumerate(batches):
            chosen[g] += [got[i] for i in batch if i in got]
    every = [item.id for items in chosen for item in items]
    if not every:
        return chosen
    # The load under the locks: the votes from the locking read (it returns each row's
    # newest committed version, and no vote changes it while we hold the lock), the open
    # leases from a statement of its own, which sees every commit made by transactions
    # that held these rows before us (PostgreSQL READ COMMITTED).
    leases = _open_sides(every, now)
    if sides is not None:
        sides.update(leases)
    return [[i for i in items if i.n_votes + sum(leases[i.id]) < config.votes_per_item]
            for items in chosen]


@cache
def _lock_items():
    """The items ``ids``, locked in id order, skipping those locked by others."""
    return (select(Item).where(Item.id.in_(bindparam("ids", expanding=True))).order_by(Item.id)
            .with_for_update(skip_locked=True).execution_options(populate_existing=True))


def _lease_items_active(participant: Participant, study: Study, config: StudyConfig,
                        now: datetime, n: int, rng: random.Random, leased: Leased = None,
                        sides: dict | None = None) -> tuple[list[Item], dict[int, float]]:
    """Active design: the pairs from :func:`study_app.active.choose_pairs`, then for each
    the lowest-load eligible items of that pair, leased as :func:`_lease_items` does, all
    pairs' items locked and re-checked together (a pair whose free items were all leased
    meanwhile: the shortfall from any pair, without a gain). Returns the items and each
    chosen item's information gain (bits) by id. ``leased``: see :data:`Leased`;
    ``sides``: as :func:`_lock_fresh`. With ``n`` = 0 (e.g. a participant's last fetch)
    it only brings the posterior and the stopping rule up to date, so the last votes can
    stop the study."""
    from study_app import active  # numpy/scipy: loaded by the first active study only

    if n <= 0:
        if study.main_closed_at is None:
            active.current_posterior(study, config, now)
        return [], {}

    choices = active.choose_pairs(study, config, now, n,
                                  f"{config.seed}:{participant.public_id}:{participant.n_issued}",
                                  active.read_pair_state(study, config, participant.id, now))
    wanted: dict[tuple[int, int], list[float]] = {}
    lowest: dict[tuple[int, int], int | None] = {}
    for a, b, gain, level in choices:
        wanted.setdefault((a, b), []).append(gain)
        lowest[(a, b)] = level
    items: list[Item] = []
    gains: dict[int, float] = {}
    reads = [(pair, 2 * len(pair_gains), rng.randrange(1, DRAW_MOD))
             for pair, pair_gains in wanted.items()]
    # every pair's first read in one statement (the pairs' lowest free level is known)
    prefetch = [(pair, want, start, lowest[pair]) for pair, want, start in reads
                if lowest[pair] is not None]
    first = {}
    if len(prefetch) > 1:  # (one pair: its own read is as many round trips)
        first = dict(zip([pair for pair, *_ in prefetch],
                         _read_first_levels(participant, study, config, now, prefetch),
                         strict=True))
    groups = [(_lowest_load(participant, study, config, now, want, start, pair, leased=leased,
                            from_level=lowest[pair], first=first.get(pair)), want // 2)
              for pair, want, start in reads]
    for pair_items, pair_gains in zip(_lock_fresh(groups, config, now, sides),
                                      wanted.values(), strict=True):
        for item, gain in zip(pair_items, pair_gains, strict=False):
            items.append(item)
            gains[item.id] = gain
    if len(items) < len(choices):
        items += _lease_items(participant, study, config, now, len(choices) - len(items), rng,
                              exclude=[i.id for i in items], leased=leased, sides=sides)
    active.remember_pairs(study, items)
    return items, gains


def _random_item(study: Study, start: int) -> Item:
    """The study's first item in draw-key order from ``start`` (index ix_item_study_draw)."""
    query = select(Item).where(Item.study_id == study.id).order_by(Item.draw_key).limit(1)
    return (db.session.scalars(query.where(Item.draw_key >= start)).first()
            or db.session.scalars(query).one())


def _open_sides(ids: list[int], now: datetime) -> dict[int, tuple[int, int]]:
    """Open non-preview main leases per item id: (showing a left, showing b left)."""
    counts = {i: [0, 0] for i in ids}
    if ids:
        for item_id, a_left, count in read(_open_sides_query(),
                                           {"ids": ids, "now": now}).all():
            counts[item_id][0 if a_left else 1] += count
    return {i: (a, b) for i, (a, b) in counts.items()}


def _side_counts(items: list[Item], now: datetime,
                 known: dict | None = None) -> dict[int, tuple[int, int]]:
    """(a shown left, b shown left) over votes + open leases, per item id (``known``:
    :func:`_open_sides` already read for some of them under their locks)."""
    leases = dict(known or {})
    leases.update(_open_sides([i.id for i in items if i.id not in leases], now))
    return {i.id: (i.n_a_left + leases[i.id][0], i.n_votes - i.n_a_left + leases[i.id][1])
            for i in items}


def _stimuli(pairs: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[str, str]]:
    """(image id, condition id) -> (sha256, condition name) for the given pairs."""
    if not pairs:
        return {}
    rows = read(_stimuli_query(), {"images": sorted({p[0] for p in pairs}),
                                   "conditions": sorted({p[1] for p in pairs})}).all()
    return {(r[0], r[1]): (r[2], r[3]) for r in rows if (r[0], r[1]) in pairs}


@cache
def _open_sides_query():
    return select(Trial.item_id, Trial.a_left, func.count(Trial.id)).where(
        Trial.item_id.in_(bindparam("ids", expanding=True)), open_main_lease(),
    ).group_by(Trial.item_id, Trial.a_left)


@cache
def _stimuli_query():
    return (
        select(Stimulus.image_id, Stimulus.condition_id, Stimulus.sha256, Condition.name)
        .join(Condition, Stimulus.condition_id == Condition.id)
        .where(Stimulus.image_id.in_(bindparam("images", expanding=True)),
               Stimulus.condition_id.in_(bindparam("conditions", expanding=True)))
    )


@cache
def _image_shas():
    return select(Image.id, Image.sha256).where(Image.id.in_(bindparam("ids", expanding=True)))


def image_shas(image_ids) -> dict[int, str]:
    """The reference images' sha256 by image id."""
    return dict(read(_image_shas(), {"ids": sorted(set(image_ids))}).all()) if image_ids else {}


def _new_trial(participant: Participant, study: Study, now: datetime, config: StudyConfig,
               **fields) -> Trial:
    return Trial(
        token=secrets.token_urlsafe(24), study_id=study.id, participant_id=participant.id,
        preview=participant.preview, status="leased", leased_at=now,
        expires_at=now + timedelta(seconds=config.lease_seconds), sequence=0, **fields,
    )


def _insert_trials(trials: list[Trial]) -> None:
    """Insert ``trials`` (new, every column but the id set) in one statement and add them
    to the session as the rows they now are (no unit-of-work flush: for a fetch's four
    trials that cost more Python than the rest of the insert)."""
    if not trials:
        return
    columns = _trial_columns()
    ids = db.session.connection().execute(
        _insert_trials_query(), [{c: getattr(t, c) for c in columns} for t in trials]
    ).scalars().all()
    for trial, trial_id in zip(trials, ids, strict=True):
        trial.id = trial_id
        make_transient_to_detached(trial)
    db.session.add_all(trials)


@cache
def _trial_columns() -> tuple[str, ...]:
    return tuple(c.key for c in Trial.__table__.columns if c.key != "id")


@cache
def _insert_trials_query():
    return insert(Trial).returning(Trial.id, sort_by_parameter_order=True)


def open_trials(participant: Participant, now: datetime) -> list[Trial]:
    """The participant's leased, unexpired trials in issue order."""
    return list(db.session.scalars(_open_trials_query(),
                                   {"participant_id": participant.id, "now": now}))


@cache
def _open_trials_query():
    return (select(Trial)
            .where(Trial.participant_id == bindparam("participant_id"), open_lease())
            .order_by(Trial.sequence))


def lease_trials(participant_id: int, study: Study, config: StudyConfig,
                 now: datetime | None = None,
                 locked: Participant | None = None) -> tuple[list[Trial], bool]:
    """The participant's open trials, topped up to ``batch_size`` with new leases; the
    open ones are renewed (they expire ``lease_seconds`` from ``now``).

    ``now``: :func:`write_time` once the locks are held (tests pass a clock of their own).
    Returns ``(trials, done)``; ``done`` is true when nothing is open and nothing more can
    be issued (the participant may finish). A paused (or draft) study returns the open
    trials without renewing them and issues nothing new; a closed one answers 409
    ``study_closed`` and changes nothing. Previews run in any state. ``locked``: the
    participant's row if this transaction already locked it (as :func:`lock_participant`).
    """
    participant = locked if locked is not None else lock_participant(participant_id)
    if participant.status != "started":
        raise ApiError(409, "participant_finished",
                       f"this participation is already {participant.status}")
    live = study.status == "live" or participant.preview
    if study.status == "closed" and not participant.preview:
        raise ApiError(409, "study_closed", "this study is closed and shows no more trials")
    if live and not participant.preview:
        _lock_leased_items(participant)
    now = now or write_time()
    trials = open_trials(participant, now)
    if not live:  # paused or draft: the open trials as they are, nothing renewed or new
        return trials, False
    # A participant who asks is still there: their open leases run lease_seconds from now
    # (an abandoned page stops asking, so its leases still expire and free the items).
    renewed_until = now + timedelta(seconds=config.lease_seconds)
    for trial in trials:
        trial.expires_at = max(trial.expires_at, renewed_until)
    want = config.batch_size - len(trials)
    if want <= 0:
        return trials, False
    rng = random.Random(f"{config.seed}:{participant.public_id}:{participant.n_issued}")
    # the study's leased items free for the participant, read at most once for the count
    # and the lease (this fetch's own leases are made after both), and only if the unleased
    # items do not settle them
    leased = None if participant.preview else cache(
        lambda: _leased_free_items(participant, study, config, now))
    remaining = remaining_trials(participant, study, config, now, leased)
    kinds = draw_kinds(want, remaining, rng)
    n_main = kinds.count("main")
    gains: dict[int, float] = {}
    sides: dict[int, tuple[int, int]] = {}  # the open leases of the items locked below
    if config.design == "active" and not participant.preview:
        items, gains = _lease_items_active(participant, study, config, now, n_main, rng,
                                           leased, sides)
    else:
        items = _lease_items(participant, study, config, now, n_main, rng, leased=leased,
                             sides=sides)
    if len(items) < n_main:  # fewer items than hoped: fill the gap with other kinds
        rest = dict(remaining, main=0)
        for kind in kinds:
            if kind != "main":
                rest[kind] -= 1
        kinds = [k for k in kinds if k != "main"] + draw_kinds(n_main - len(items), rest, rng)
    new: list[Trial] = []
    needed: set[tuple[int, int]] = set()
    sides = _side_counts(items, now, sides) if items else {}
    jnd = config.task == "jnd"
    for item in items:
        a_left = choose_a_left(*sides[item.id], rng)
        needed |= {(item.image_id, item.condition_a_id), (item.image_id, item.condition_b_id)}
        # jnd (a = b): "left" is the first image shown; a_left: the reconstruction first
        first, second = ((item.condition_a_id, REFERENCE if jnd else item.condition_b_id)
                         if a_left else
                         (REFERENCE if jnd else item.condition_b_id, item.condition_a_id))
        new.append(_new_trial(participant, study, now, config, kind="main", item_id=item.id,
                              image_id=item.image_id, a_left=a_left,
                              condition_left=str(first), condition_right=str(second),
                              left_sha256="", right_sha256="", info_gain=gains.get(item.id)))
    for _ in range(kinds.count("catch") if jnd else 0):  # the reference twice: "same"
        image_id = _random_item(study, rng.randrange(1, DRAW_MOD)).image_id
        new.append(_new_trial(participant, study, now, config, kind="catch", item_id=None,
                              image_id=image_id, expected_condition=JND_CATCH_EXPECTED,
                              condition_left=REFERENCE, condition_right=REFERENCE,
                              left_sha256="", right_sha256=""))
    for _ in range(0 if jnd else kinds.count("catch")):
        item = _random_item(study, rng.randrange(1, DRAW_MOD))
        condition_id = rng.choice([item.condition_a_id, item.condition_b_id])
        needed.add((item.image_id, condition_id))
        reference_left = rng.random() < 0.5
        new.append(_new_trial(participant, study, now, config, kind="catch", item_id=None,
                              image_id=item.image_id, expected_condition=REFERENCE,
                              condition_left=REFERENCE if reference_left else str(condition_id),
                              condition_right=str(condition_id) if reference_left else REFERENCE,
                              left_sha256="", right_sha256=""))
    if kinds.count("repeat"):
        candidates = _repeat_candidates(participant, now)
        for original in rng.sample(candidates, min(kinds.count("repeat"), len(candidates))):
            new.append(_new_trial(participant, study, now, config, kind="repeat",
                                  item_id=original.item_id, image_id=original.image_id,
                                  repeat_of_id=original.id,
                                  a_left=None if original.a_left is None else not original.a_left,
                                  condition_left=original.condition_right,
                                  condition_right=original.condition_left,
                                  left_sha256=original.right_sha256,
                                  right_sha256=original.left_sha256))
    stimuli = _stimuli(needed)
    references = image_shas([t.image_id for t in new  # the sides that show the reference
                             if REFERENCE in (t.condition_left, t.condition_right)])
    for trial in new:
        if trial.left_sha256:  # a repeat: copied from its original
            continue
        for side in ("left", "right"):
            value = getattr(trial, f"condition_{side}")
            if value == REFERENCE:
                sha = references[trial.image_id]
            else:
                sha, value = stimuli[(trial.image_id, int(value))]
            setattr(trial, f"condition_{side}", value)
            setattr(trial, f"{side}_sha256", sha)
    rng.shuffle(new)
    for offset, trial in enumerate(new):
        trial.sequence = participant.n_issued + offset
    participant.n_issued += len(new)
    _insert_trials(new)
    trials.extend(new)
    if trials:
        return trials, False
    # Nothing issued: done only if nothing could be issued (items locked by a concurrent
    # transaction right now still count as available: ask again).
    return trials, not any(remaining_trials(participant, study, config, now).values())


def record_vote(participant_id: int, study: Study, vote: VoteInput, reference_shown: bool,
                now: datetime | None = None) -> tuple[Vote, bool]:
    """Store the vote for ``vote.trial_token`` exactly once; ``(vote, replayed)``.

    ``now`` (the expiry check and ``received_at``): :func:`write_time` once the
    participant, item and trial are locked, unless a test passes a clock of its own.

    Raises :class:`ApiError`: 404 unknown trial, 403 another participant's trial, 409 a
    different choice for an answered trial / closed study / finished participant, 410 an
    expired or released lease.
    """
    trial = db.session.scalars(select(Trial).where(Trial.token == vote.trial_token)).first()
    if trial is None or trial.study_id != study.id:
        raise ApiError(404, "unknown_trial", "no trial has this token in this study",
                       field="trial_token")
    if trial.participant_id != participant_id:
        raise ApiError(403, "trial_not_assigned",
                       "this trial was issued to another participant", field="trial_token")
    participant = lock_participant(participant_id)
    item = None
    if trial.kind == "main" and trial.item_id is not None:
        item = db.session.execute(
            select(Item).where(Item.id == trial.item_id).with_for_update()
            .execution_options(populate_existing=True)
        ).scalar_one()
    trial = db.session.execute(
        select(Trial).where(Trial.id == trial.id).with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()
    now = now or write_time()
    if trial.status == "answered":
        existing = db.session.scalars(select(Vote).where(Vote.trial_id == trial.id)).one()
        if existing.choice != vote.choice:
            raise ApiError(409, "vote_conflict",
                           f"this trial was already answered '{existing.choice}'; a vote "
                           "cannot be changed", field="choice")
        return existing, True
    if study.status == "closed":
        raise ApiError(409, "study_closed", "this study is closed and accepts no more votes")
    if participant.status != "started":
        raise ApiError(409, "participant_finished",
                       f"this participation is already {participant.status}")
    if trial.status != "leased" or trial.expires_at <= now:
        raise ApiError(410, "trial_expired",
                       "this trial's lease expired and it went back to the pool; "
                       "fetch the next trials")
    _check_task(trial, vote, study)
    chosen = chosen_condition(vote.choice, trial.condition_left, trial.condition_right)
    row = Vote(
        trial_id=trial.id, study_id=study.id, participant_id=participant.id,
        trial_index=participant.n_answered, choice=vote.choice, chosen_condition=chosen,
        rt_ms=vote.rt_ms, presented_at=vote.presented_at, answered_at=vote.answered_at,
        received_at=now, reference_shown=reference_shown, viewport_w=vote.viewport_w,
        viewport_h=vote.viewport_h, device_pixel_ratio=vote.device_pixel_ratio,
        **_timing_columns(vote),
    )
    db.session.add(row)
    trial.status = "answered"
    participant.n_answered += 1
    if item is not None and not trial.preview:
        item.n_votes += 1
        item.n_a_left += 1 if trial.a_left else 0
        item.n_a_wins += 1 if chose_a(vote.choice, trial.a_left) else 0
    db.session.flush()
    return row, False


# SQLite: the common case of a vote in 5 statements straight on the driver connection
# (sqlite3 caches them prepared; SQLAlchemy's per-statement overhead was most of a vote's
# time). Inside BEGIN IMMEDIATE this transaction is the only writer, so what the read
# finds cannot change before the writes.
_VOTE_READ_SQLITE = """
SELECT p.id, s.id, t.id, t.kind, t.item_id, t.preview, t.a_left, t.condition_left,
       t.condition_right, p.n_answered,
       coalesce(json_extract(s.config, '$.question_mode') = :reference_mode, 0)
FROM participant p
JOIN study s ON s.id = p.study_id
JOIN trial t ON t.participant_id = p.id AND t.study_id = s.id
WHERE p.token = :participant_token AND t.token = :trial_token AND p.status = 'started'
  AND s.status <> 'closed' AND t.status = 'leased' AND t.expires_at > :now
  AND coalesce(json_extract(s.config, '$.task'), '2afc') = :task
"""  # :now is read inside BEGIN IMMEDIATE (no other writer until this one commits)
_VOTE_COUNT_SQLITE = "UPDATE participant SET n_answered = n_answered + 1 WHERE id = ?"
_VOTE_ITEM_SQLITE = ("UPDATE item SET n_votes = n_votes + 1, n_a_left = n_a_left + ?, "
                     "n_a_wins = n_a_wins + ? WHERE id = ?")
_VOTE_CLAIM_SQLITE = "UPDATE trial SET status = 'answered' WHERE id = ?"
_VOTE_INSERT_SQLITE = """
INSERT INTO vote (trial_id, study_id, participant_id, trial_index, choice, chosen_condition,
                  rt_ms, presented_at, answered_at, received_at, reference_shown,
                  viewport_w, viewport_h, device_pixel_ratio, exposure_requested_ms,
                  frame_period_ms, exposure_frames_requested, exposure_onset_ms,
                  exposure_offset_ms, exposure_frames_measured, isi_requested_ms,
                  second_requested_ms, second_frames_requested, second_onset_ms,
                  second_offset_ms, second_frames_measured)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


def _timing_columns(vote: VoteInput) -> dict[str, float | int | None]:
    """The vote's frame-timing columns by name, in ``NO_TIMING``'s order (None where the
    vote has no frame timing / no sequential presentation)."""
    columns = dict(NO_TIMING)
    if vote.timing is not None:
        columns.update(vote.timing.columns())
    if vote.sequence is not None:
        columns.update(vote.sequence.__dict__)
    return columns


def chose_a(choice: str, a_left: bool | None) -> bool:
    """Whether a 2afc answer chose the item's condition a (shown left when ``a_left``);
    false for a JND answer ("same" / "different"), which chooses no condition."""
    return choice in CHOICES and a_left is not None and (choice == "left") == bool(a_left)


def chosen_condition(choice: str, condition_left: str, condition_right: str) -> str:
    """What ``vote.chosen_condition`` stores: the chosen side's condition (2afc), or the
    answer itself (jnd: "same" / "different")."""
    if choice in JND_ANSWERS:
        return choice
    return condition_left if choice == "left" else condition_right


def _check_task(trial: Trial, vote: VoteInput, study: Study) -> None:
    """A 2afc answer to a JND study's trial (or the reverse) is refused (400)."""
    task = study.config.get("task", "2afc")
    if vote.task != task:
        allowed = JND_ANSWERS if task == "jnd" else CHOICES
        raise ApiError(400, "invalid_field",
                       f"this is a {task} study: 'choice' must be one of {list(allowed)}",
                       field="choice")


def record_vote_sqlite(connection: Connection, participant_token: str, vote: VoteInput,
                       now: datetime | None = None) -> dict | None:
    """SQLite, on ``connection`` inside ``BEGIN IMMEDIATE``: the common case of a vote;
    ``None`` = not it.

    Returns the answer ``{"choice", "trial_index", "received_at"}`` for a fresh vote on an
    open lease of a started participant in a study that is not closed; ``None`` with
    nothing changed for anything else (unknown token, replay, expired, finished...), which
    :func:`record_vote` then answers precisely. ``now`` defaults to the time read here,
    inside the write transaction (see :func:`write_time`)."""
    as_stored = _datetime_binder(connection.dialect)
    driver = connection.connection.driver_connection
    now = now or utcnow()
    row = driver.execute(_VOTE_READ_SQLITE, {
        "participant_token": participant_token, "trial_token": vote.trial_token,
        "reference_mode": REFERENCE_QUESTION_MODE, "now": as_stored(now),
        "task": vote.task}).fetchone()
    if row is None:
        return None
    (participant_id, study_id, trial_id, kind, item_id, preview, a_left, condition_left,
     condition_right, n_answered, reference_shown) = row
    driver.execute(_VOTE_COUNT_SQLITE, (participant_id,))
    if kind == "main" and item_id is not None and not preview:
        driver.execute(_VOTE_ITEM_SQLITE, (1 if a_left else 0,
                                           1 if chose_a(vote.choice, a_left) else 0, item_id))
    driver.execute(_VOTE_CLAIM_SQLITE, (trial_id,))
    driver.execute(_VOTE_INSERT_SQLITE, (
        trial_id, study_id, participant_id, n_answered, vote.choice,
        chosen_condition(vote.choice, condition_left, condition_right), vote.rt_ms,
        as_stored(vote.presented_at), as_stored(vote.answered_at), as_stored(now),
        bool(reference_shown), vote.viewport_w, vote.viewport_h, vote.device_pixel_ratio,
        *_timing_columns(vote).values()))
    return {"choice": vote.choice, "trial_index": n_answered, "received_at": now}


_DATETIME_BINDERS: dict[str, object] = {}


def _datetime_binder(dialect):
    """The function that turns an aware datetime into what a UTCDateTime column stores."""
    if dialect.name not in _DATETIME_BINDERS:
        _DATETIME_BINDERS[dialect.name] = Vote.__table__.c.received_at.type.bind_processor(dialect)
    return _DATETIME_BINDERS[dialect.name]


# PostgreSQL: the whole common case as one statement, run in autocommit (one round trip).
# The read locks the participant and the trial (FOR UPDATE re-checks both against their
# newest committed versions, so a concurrent finish or replay shows up as no row), then
# the item; only then is the clock read and the lease's expiry judged (``valid``): a vote
# that waited for the item while its lease ran out is refused, in the order the item's
# lock gives (see the module docstring). With every row locked and checked, the writes
# that follow cannot fail, so the statement either changes nothing (``valid`` = 0: the
# full path answers) or stores the whole vote. Lock order participant → trial → item:
# every other path that touches this participant's trial holds the participant's lock
# first, so the item's place in the order cannot deadlock.
_VOTE_STATEMENT_POSTGRESQL = """
WITH found AS (
    SELECT p.id AS participant_id, s.id AS study_id, t.id AS trial_id, t.kind, t.item_id,
           t.preview, t.a_left, t.expires_at,
           CASE %(choice)s WHEN 'left' THEN t.condition_left
                           WHEN 'right' THEN t.condition_right ELSE %(choice)s END
               AS chosen_condition,
           coalesce((s.config ->> 'question_mode') = %(reference_mode)s, false) AS reference_shown
    FROM participant p
    JOIN study s ON s.id = p.study_id
    JOIN trial t ON t.participant_id = p.id AND t.study_id = s.id
    WHERE p.token = %(participant_token)s AND t.token = %(trial_token)s AND p.status = 'started'
      AND s.status <> 'closed' AND t.status = 'leased'
      AND coalesce(s.config ->> 'task', '2afc') = %(task)s
    FOR UPDATE OF p, t
), item_locked AS (
    SELECT item.id FROM item JOIN found ON item.id = found.item_id
    WHERE found.kind = 'main' AND NOT found.preview
    FOR UPDATE OF item
), clock AS (  -- read after every lock above is held (the aggregate drains item_locked)
    SELECT coalesce(%(now)s::timestamp, clock_timestamp() AT TIME ZONE 'UTC') AS now
    FROM (SELECT count(*) FROM item_locked) AS held
), valid AS (
    SELECT found.*, clock.now FROM found, clock WHERE found.expires_at > clock.now
), counted AS (
    UPDATE participant SET n_answered = participant.n_answered + 1
    FROM valid WHERE participant.id = valid.participant_id
    RETURNING participant.n_answered
), claimed AS (
    UPDATE trial SET status = 'answered'
    FROM valid WHERE trial.id = valid.trial_id
    RETURNING trial.id
), item_counted AS (
    UPDATE item SET n_votes = item.n_votes + 1,
                    n_a_left = item.n_a_left + CASE WHEN valid.a_left THEN 1 ELSE 0 END,
                    n_a_wins = item.n_a_wins + CASE WHEN %(choice)s IN ('left', 'right')
                        AND (%(choice)s = 'left') = valid.a_left THEN 1 ELSE 0 END
    FROM valid
    WHERE item.id = valid.item_id AND valid.kind = 'main' AND NOT valid.preview
    RETURNING item.id
), stored AS (
    INSERT INTO vote (trial_id, study_id, participant_id, trial_index, choice,
                      chosen_condition, rt_ms, presented_at, answered_at, received_at,
                      reference_shown, viewport_w, viewport_h, device_pixel_ratio,
                      exposure_requested_ms, frame_period_ms, exposure_frames_requested,
                      exposure_onset_ms, exposure_offset_ms, exposure_frames_measured,
                      isi_requested_ms, second_requested_ms, second_frames_requested,
                      second_onset_ms, second_offset_ms, second_frames_measured)
    SELECT valid.trial_id, valid.study_id, valid.participant_id, counted.n_answered - 1,
           %(choice)s, valid.chosen_condition, %(rt_ms)s, %(presented_at)s, %(answered_at)s,
           valid.now, valid.reference_shown, %(viewport_w)s, %(viewport_h)s,
           %(device_pixel_ratio)s, %(exposure_requested_ms)s::float8,
           %(frame_period_ms)s::float8, %(exposure_frames_requested)s::integer,
           %(exposure_onset_ms)s::float8, %(exposure_offset_ms)s::float8,
           %(exposure_frames_measured)s::integer, %(isi_requested_ms)s::float8,
           %(second_requested_ms)s::float8, %(second_frames_requested)s::integer,
           %(second_onset_ms)s::float8, %(second_offset_ms)s::float8,
           %(second_frames_measured)s::integer
    FROM valid, counted
    RETURNING trial_index, received_at
)
SELECT (SELECT count(*) FROM valid) AS found, (SELECT count(*) FROM claimed) AS claimed,
       (SELECT count(*) FROM item_counted) AS items, stored.trial_index, stored.received_at
FROM (SELECT 1) AS one LEFT JOIN stored ON true
"""


def record_vote_postgresql(connection: Connection, participant_token: str, vote: VoteInput,
                           now: datetime | None = None) -> dict | None:
    """PostgreSQL: the common case of a vote as one statement (run it in autocommit).

    Same contract as :func:`record_vote_sqlite`: the answer for a fresh vote on an open
    lease of a started participant in a study that is not closed, else ``None`` with
    nothing changed (the caller then runs :func:`record_vote`, which answers precisely).
    ``now`` (tests only) replaces the server's clock, read once the rows are locked."""
    as_stored = _datetime_binder(connection.dialect)
    driver = connection.connection.driver_connection
    found, claimed, _items, trial_index, received_at = driver.execute(
        _VOTE_STATEMENT_POSTGRESQL, {
            "participant_token": participant_token, "trial_token": vote.trial_token,
            "choice": vote.choice, "reference_mode": REFERENCE_QUESTION_MODE,
            "task": vote.task,
            "now": None if now is None else as_stored(now), "rt_ms": vote.rt_ms,
            "presented_at": as_stored(vote.presented_at),
            "answered_at": as_stored(vote.answered_at), "viewport_w": vote.viewport_w,
            "viewport_h": vote.viewport_h, "device_pixel_ratio": vote.device_pixel_ratio,
            **_timing_columns(vote)},
        # prepared server-side by psycopg's own policy (after 5 uses on a connection), so
        # `connect_args={"prepare_threshold": None}` (PgBouncer) switches it off here too
    ).fetchone()
    if found == 0:
        return None
    if claimed != 1 or trial_index is None:
        # cannot happen with every row locked; if it ever did, say so loudly (it committed)
        raise RuntimeError(f"vote statement stored a partial vote: found {found}, "
                           f"claimed {claimed}, trial_index {trial_index}")
    return {"choice": vote.choice, "trial_index": trial_index,
            "received_at": received_at.replace(tzinfo=UTC)}


def finish(participant_id: int, study: Study, config: StudyConfig, status: str,
           now: datetime | None = None) -> Participant:
    """End a participation as ``completed`` (nothing left to answer) or ``returned``.

    Open leases are released to the pool. Finishing again with the same status is a
    no-op; with another status it is a 409.
    """
    participant = lock_participant(participant_id)
    now = now or write_time()
    if participant.status != "started":
        if participant.status == status:
            return participant
        raise ApiError(409, "participant_finished",
                       f"this participation is already {participant.status}")
    if status == "completed":
        if open_trials(participant, now):
            raise ApiError(409, "trials_open",
                           "answer the open trials first (or finish with status 'returned')")
        remaining = remaining_trials(participant, study, config, now)
        if any(remaining.values()):
            raise ApiError(409, "trials_remaining",
                           f"{sum(remaining.values())} more trial(s) can be issued; fetch "
                           "them first (or finish with status 'returned')")
    db.session.execute(
        update(Trial).where(Trial.participant_id == participant.id, Trial.status == "leased")
        .values(status="released")
    )
    participant.status = status
    participant.finished_at = now
    db.session.flush()
    return participant
