"""The active design in the study server: the shared posterior, the pairs to lease next,
the stopping rule.

Runs inside :func:`study_app.scheduling.lease_trials` (one write transaction, the
participant locked). The numerical core is :mod:`analysis.active` (pure); this module
reads and writes the database around it:

- the posterior (``study_posterior``, one row per study) is recomputed from the per-pair
  vote tallies (``pair_tally``, kept by triggers on ``item``: pairs × vote levels rows,
  whatever the number of items and votes) when ``posterior_every`` votes arrived since it
  was last computed, by the one transaction that gets its row lock (PostgreSQL ``FOR
  UPDATE SKIP LOCKED``: the others use the previous one instead of waiting; SQLite: the
  only writer anyway), so every gunicorn worker uses the same posterior and a restart
  loses nothing; the per-pair counts of a fetch come from the same tallies;
- the pairs are chosen with :func:`analysis.active.select_pairs`, jointly with every open
  lease of the study (the batch complements what others are answering now), among the
  pairs that still have an item this participant was never issued with load < K; the
  item of a pair is then leased exactly as in a balanced study (lowest load, locked,
  re-checked), so the "no item beyond K" and "every vote once" rules are unchanged;
- the stopping rule (``stop_half_width`` and/or ``vote_budget``) sets
  ``study.main_closed_at`` once (a conditional UPDATE), after which no main trial is
  issued; catch and repeat trials and the open leases still finish. With a vote budget,
  the fetches of a study take the posterior row's lock (waiting) before they count votes
  and leases, so concurrent fetches cannot together lease past the budget (lock order:
  participant → posterior → study → items; a vote takes none of the first three after
  the participant, so no cycle).

The live posterior uses every main vote (no exclusions): it only steers the design; the
analysis fits its scales from the exported votes (``pstudy analyze``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from functools import cache

import numpy as np
from sqlalchemy import bindparam, func, literal, select, union_all, update

from analysis.active import Posterior, all_pairs, select_pairs, thurstone_posterior
from study_app.extensions import db, read
from study_app.models import Condition, Item, PairTally, Study, StudyPosterior, Trial, utcnow
from study_app.scheduling import issued_item_ids, open_main_lease


def _tally(*columns):
    """SQL: ``columns`` of the study's (bind ``study_id``) :class:`PairTally` rows that
    hold items."""
    return select(*columns).where(PairTally.study_id == bindparam("study_id"),
                                  PairTally.n_items > 0)


def study_pairs(study: Study) -> list[tuple[int, int]]:
    """The study's condition pairs as its items store them ``(condition_a_id,
    condition_b_id)``, ascending (from the pair tallies: pairs × levels rows)."""
    rows = db.session.execute(
        _tally(PairTally.condition_a_id, PairTally.condition_b_id).distinct(),
        {"study_id": study.id}).all()
    return sorted((int(a), int(b)) for a, b in rows)


def study_condition_ids(study: Study) -> list[int]:
    """The ids of the conditions in the study's items, ascending (the scale's order)."""
    return sorted({c for pair in study_pairs(study) for c in pair})


def win_matrix(study: Study, condition_ids: list[int]) -> np.ndarray:
    """``wins[i, j]``: main votes (not previews) that chose condition i over j, from the
    pair tallies (what grouping the study's votes by pair and chosen condition gives)."""
    index = {cid: k for k, cid in enumerate(condition_ids)}
    wins = np.zeros((len(condition_ids), len(condition_ids)))
    for a_id, b_id, votes, items, a_wins in read(_tally_wins(), {"study_id": study.id}).all():
        a, b = index[a_id], index[b_id]
        wins[a, b] += a_wins
        wins[b, a] += votes * items - a_wins
    return wins


@cache
def _tally_wins():
    return _tally(PairTally.condition_a_id, PairTally.condition_b_id, PairTally.n_votes,
                  PairTally.n_items, PairTally.a_wins)


def main_votes(study: Study) -> int:
    """Main votes stored so far (the pair tallies: Σ level × items)."""
    return int(
        db.session.scalar(
            select(func.coalesce(func.sum(PairTally.n_votes * PairTally.n_items), 0)).where(
                PairTally.study_id == study.id
            )
        )
    )


def create_posterior(study: Study) -> None:
    """Store the prior (no votes yet) for a new active study (flushes)."""
    ids = study_condition_ids(study)
    db.session.add(
        StudyPosterior(
            study_id=study.id,
            n_votes=0,
            conditions=ids,
            posterior=thurstone_posterior(np.zeros((len(ids),) * 2)).to_dict(),
        )
    )
    db.session.flush()


def _memo_key(study: Study) -> tuple:
    """A study's key in this process's memos: database, id and creation time (a database
    made anew at the same address is another key)."""
    return str(db.engine.url), study.id, study.created_at


# The stored posterior as last parsed by this process, per study (:func:`_memo_key`): a
# memo of the row, used only while the row's (n_votes, computed_at) is unchanged. No state
# of its own: a restart or another worker reads the same row. Its arrays are read-only.
_parsed: dict[tuple, tuple[tuple, Posterior, list[int]]] = {}


@cache
def _posterior_version():
    return select(StudyPosterior.n_votes, StudyPosterior.computed_at).where(
        StudyPosterior.study_id == bindparam("study_id"))


@cache
def _posterior_row():
    return select(StudyPosterior.n_votes, StudyPosterior.computed_at,
                  StudyPosterior.conditions, StudyPosterior.posterior).where(
        StudyPosterior.study_id == bindparam("study_id"))


def stored_posterior(study: Study) -> tuple[int, Posterior, list[int]] | None:
    """``(votes it was computed from, posterior, condition ids)`` of the study's stored
    row (None: no row): a small read of the row's version, the row itself parsed only
    when it changed since this process last parsed it."""
    params = {"study_id": study.id}
    version = read(_posterior_version(), params).first()
    if version is None:
        return None
    key = _memo_key(study)
    known = _parsed.get(key)
    if known is None or known[0] != tuple(version):
        row = read(_posterior_row(), params).one()
        posterior = Posterior.from_dict(row.posterior)
        posterior.mean.setflags(write=False)
        posterior.cov.setflags(write=False)
        known = (row.n_votes, row.computed_at), posterior, [int(i) for i in row.conditions]
        _parsed[key] = known
    return known[0][0], known[1], known[2]


def current_posterior(
    study: Study, config, now: datetime, total: int | None = None
) -> tuple[Posterior, list[int]]:
    """The study's posterior, recomputed first when ``posterior_every`` votes are new and
    this transaction gets the row (else the stored one; see the module docstring); then
    the stopping rule is checked. ``total``: the main votes now, if already counted."""
    stored = stored_posterior(study)
    total = main_votes(study) if total is None else total
    if stored is not None and total - stored[0] < config.posterior_every:
        posterior, ids = stored[1], stored[2]
    else:
        posterior, ids = _recompute(study, stored, now)
    check_stopping_rule(study, config, posterior, total, now)
    return posterior, ids


def _recompute(
    study: Study, stored: tuple[int, Posterior, list[int]] | None, now: datetime
) -> tuple[Posterior, list[int]]:
    locked = db.session.execute(
        select(StudyPosterior)
        .where(StudyPosterior.study_id == study.id)
        .with_for_update(skip_locked=True)
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if stored is not None and locked is None:  # another worker is recomputing it right now
        return stored[1], stored[2]
    # the conditions never change after the study is made: the stored list when there is one
    ids = list(locked.conditions) if locked is not None else study_condition_ids(study)
    previous = None if locked is None else Posterior.from_dict(locked.posterior)
    initial = previous.mean if previous is not None and len(previous.mean) == len(ids) else None
    posterior = thurstone_posterior(win_matrix(study, ids), initial=initial)
    if locked is not None:  # (a study made before it had a row: kept in memory only)
        locked.n_votes = posterior.n_votes
        locked.conditions = ids
        locked.posterior = posterior.to_dict()
        locked.computed_at = now
    return posterior, ids


def stop_reason(config, posterior: Posterior, votes: int) -> str | None:
    """Why the stopping rule says stop (text for the dashboard), or None to go on; the
    precision target is judged on ``posterior`` (at least one vote)."""
    if config.vote_budget is not None and votes >= config.vote_budget:
        return f"vote budget reached: {votes} main votes (budget {config.vote_budget})"
    if config.stop_half_width is not None and votes > 0:
        widest = float(posterior.half_widths().max())
        if widest <= config.stop_half_width and posterior.n_votes > 0:
            return (
                f"precision target met: every condition's 95 % half-width ≤ "
                f"{widest:.3f} JOD (target {config.stop_half_width:g}) after "
                f"{posterior.n_votes} votes"
            )
    return None


def check_stopping_rule(
    study: Study, config, posterior: Posterior, votes: int, now: datetime
) -> bool:
    """Close the study's main trials if the rule says so (``votes``: main votes now);
    true only for the one call that closed them (a conditional UPDATE: concurrent callers
    cannot both close)."""
    if study.main_closed_at is not None:
        return False
    reason = stop_reason(config, posterior, votes)
    if reason is None:
        return False
    closed = db.session.execute(
        update(Study)
        .where(Study.id == study.id, Study.main_closed_at.is_(None))
        .values(main_closed_at=now, main_closed_reason=reason)
        .execution_options(synchronize_session=False)
    ).rowcount
    db.session.refresh(study, ["main_closed_at", "main_closed_reason"])
    return closed == 1


def budget_left(config, votes_and_leases: int) -> int | None:
    """Main trials that may still be leased under the vote budget (None: no budget);
    ``votes_and_leases``: main votes plus open main leases now."""
    if config.vote_budget is None:
        return None
    return max(0, config.vote_budget - votes_and_leases)


@dataclass(frozen=True)
class PairState:
    """What one fetch needs of the study's pairs, read in one statement (one snapshot: a
    vote is counted either as an open lease or as a vote, never both).

    ``per_pair``: as :func:`pair_counts`; ``open_per_pair``: the study's open main leases
    per pair ``(a, b, count)``."""

    per_pair: list[tuple[int, int, int, int, int | None]]
    open_per_pair: list[tuple[int, int, int]]


def read_pair_state(study: Study, config, participant_id: int, now: datetime,
                    lock: bool = True) -> PairState:
    """The :class:`PairState` of ``participant_id`` at ``now``. With a vote budget (and
    ``lock``) it first takes the posterior row's lock (held to the commit), so a fetch
    counts and leases under one lock and concurrent fetches never lease past the budget."""
    if lock and config.vote_budget is not None:
        read(_posterior_locked(), {"study_id": study.id})
    rows = read(_pair_state_query(), {"study_id": study.id, "participant_id": participant_id,
                                      "k": config.votes_per_item, "now": now}).all()
    levels, mine, open_items = [], Counter(), []
    for kind, a, b, level, n in rows:
        if kind == TALLY:
            levels.append((a, b, level, n))
        elif kind == ISSUED:
            mine[(a, b, level)] += 1
        else:  # LEASED: the item id in ``a``
            open_items.append((a, int(n)))
    pair_of = item_pairs(study, [item_id for item_id, _n in open_items])
    open_per_pair: Counter = Counter()
    for item_id, count in open_items:
        open_per_pair[pair_of[item_id]] += count
    return PairState(_per_pair(levels, mine, config.votes_per_item),
                     [(a, b, count) for (a, b), count in open_per_pair.items()])


# Each item's pair, per study (:func:`_memo_key`): a memo of facts that never
# change once the study is made (so never stale), filled with the items its open leases
# name; the open-lease read then needs no join to ``item`` (at 360 open leases, 360 index
# lookups: 1.2 ms of PostgreSQL's time per fetch). Cleared past ITEM_PAIRS_KEPT items.
_item_pairs: dict[tuple, dict[int, tuple[int, int]]] = {}
ITEM_PAIRS_KEPT = 200_000


@cache
def _item_pairs_query():
    return select(Item.id, Item.condition_a_id, Item.condition_b_id).where(
        Item.id.in_(bindparam("ids", expanding=True)))


def _known_pairs(study: Study) -> dict[int, tuple[int, int]]:
    return _item_pairs.setdefault(_memo_key(study), {})


def remember_pairs(study: Study, items) -> None:
    """Add the pairs of ``items`` (this process's new leases) to the memo of
    :func:`item_pairs`: the next fetch here finds them without a read."""
    known = _known_pairs(study)
    for item in items:
        known[item.id] = (item.condition_a_id, item.condition_b_id)


def item_pairs(study: Study, item_ids: list[int]) -> dict[int, tuple[int, int]]:
    """``{item id: (condition_a_id, condition_b_id)}`` for ``item_ids`` (items of
    ``study``): one read of those this process has not seen yet, if any. (A dict of its
    own: another thread may clear the memo meanwhile.)"""
    known = _known_pairs(study)
    pairs = {i: known.get(i) for i in item_ids}
    missing = sorted(i for i, pair in pairs.items() if pair is None)
    if missing:
        if len(known) + len(missing) > ITEM_PAIRS_KEPT:
            known.clear()
        for item_id, a, b in read(_item_pairs_query(), {"ids": missing}).all():
            known[item_id] = pairs[item_id] = (a, b)
    return pairs


def choose_pairs(
    study: Study, config, now: datetime, n: int, seed: str, state: PairState
) -> list[tuple[int, int, float, int | None]]:
    """Up to ``n`` (condition_a_id, condition_b_id, gain in bits, lowest vote level of a
    free item) for a participant, the pair as its items store it. The level is a lower
    bound of where the pair's lowest-load free items are (votes only ever add), so the
    lease can start reading there. ``state``: :func:`read_pair_state` of the participant
    in this transaction.

    An item is free for the participant when never issued to them and under K votes
    (open leases are not subtracted here: the lease itself re-checks the load).
    """
    per_pair = state.per_pair
    posterior, ids = current_posterior(study, config, now, sum(int(r[2]) for r in per_pair))
    if study.main_closed_at is not None:
        return []
    pairs = [(int(i), int(j)) for i, j in all_pairs(len(ids))]
    # a pair's position in ``pairs`` from its condition ids, in either order
    key = {}
    for k, (i, j) in enumerate(pairs):
        key[ids[i], ids[j]] = key[ids[j], ids[i]] = k
    counts = np.zeros(len(pairs))
    available = np.zeros(len(pairs))
    priority = np.zeros(len(pairs), bool)
    for a, b, votes, n_free, lowest in per_pair:
        k = key[a, b]
        counts[k] += votes
        available[k] = n_free
        priority[k] = lowest is not None and lowest < config.item_floor
    leased: list[tuple[int, int]] = []
    for a, b, count in state.open_per_pair:
        counts[key[a, b]] += count
        leased += [pairs[key[a, b]]] * count
    limit = budget_left(config, int(counts.sum()))
    if limit is not None:
        n = min(n, limit)
    chosen = select_pairs(
        posterior,
        n,
        counts=counts,
        pending=leased,
        available=available,
        pair_floor=config.pair_floor,
        priority=priority,
        seed=seed,
    )
    # the pair in the items' own order, and its lowest free level
    position = {pair: k for k, pair in enumerate(pairs)}
    stored = {key[r[0], r[1]]: (int(r[0]), int(r[1]), r[4]) for r in per_pair}
    return [(a, b, c.gain, lowest)
            for c in chosen for a, b, lowest in [stored[position[(c.i, c.j)]]]]


@cache
def _posterior_locked():
    return (select(StudyPosterior.study_id)
            .where(StudyPosterior.study_id == bindparam("study_id")).with_for_update())


TALLY, ISSUED, LEASED = 0, 1, 2  # the row kinds of _pair_state_query


@cache
def _pair_state_query():
    """SQL, one statement: rows ``(kind, a, b, level, n)`` of three kinds — ``TALLY``: the
    study's pair tallies (vote level, items at it); ``ISSUED``: each item the participant
    was issued that is under K (its vote level, 1); ``LEASED``: each item with open main
    leases of the study (the item's id in ``a``; its open leases; from the trials alone,
    over index ix_trial_study_open: the open leases only)."""
    tallies = _tally(literal(TALLY), PairTally.condition_a_id, PairTally.condition_b_id,
                     PairTally.n_votes, PairTally.n_items)
    issued = select(literal(ISSUED), Item.condition_a_id, Item.condition_b_id, Item.n_votes,
                    literal(1)).where(Item.id.in_(issued_item_ids()),
                                      Item.n_votes < bindparam("k"))
    leased = (
        select(literal(LEASED), Trial.item_id, literal(-1), literal(-1), func.count(Trial.id))
        .where(Trial.study_id == bindparam("study_id"), open_main_lease())
        .group_by(Trial.item_id)
    )
    return union_all(tallies, issued, leased)


def pair_counts(study: Study, config, participant_id: int,
                now: datetime | None = None) -> list[tuple[int, int, int, int, int | None]]:
    """Per condition pair (as the items store it): ``(a, b, votes, free items, lowest votes
    of a free item or None)``; an item is free for the participant when under K votes and
    never issued to them.

    The pair tallies give each pair's items per vote level (pairs × levels rows, whatever
    the study's size), then the participant's own items are taken off: the same numbers
    as grouping every item with the participant's exclusions. (``now``: when a lease is
    open, for the open-lease rows read with them; they do not enter these counts.)"""
    return read_pair_state(study, config, participant_id, now or utcnow(), lock=False).per_pair


def _per_pair(levels, mine: Counter, k: int) -> list[tuple[int, int, int, int, int | None]]:
    """:func:`pair_counts` from the tallies ``(a, b, level, items)`` and the participant's
    items under K per ``(a, b, level)``."""
    totals: dict[tuple[int, int], list] = {}
    for a, b, votes, count in sorted(levels):
        entry = totals.setdefault((a, b), [0, 0, None])
        entry[0] += votes * count
        free = count - mine[(a, b, votes)] if votes < k else 0
        if free > 0:
            entry[1] += free
            entry[2] = votes if entry[2] is None else entry[2]
    return [(a, b, v, f, low) for (a, b), (v, f, low) in totals.items()]


def precision_summary(study: Study, config) -> dict | None:
    """What the dashboard shows of an active study (None for a balanced one): the stored
    posterior's scale and 95 % half-width per condition (JOD), the target, the votes,
    the predicted votes still needed (half-widths shrink as 1 / sqrt(votes)), and whether
    and why main trials were stopped."""
    if config.design != "active":
        return None
    row = db.session.get(StudyPosterior, study.id)
    votes = main_votes(study)
    out = {
        "pair_floor": config.pair_floor,
        "item_floor": config.item_floor,
        "posterior_every": config.posterior_every,
        "target": config.stop_half_width,
        "budget": config.vote_budget,
        "votes": votes,
        "posterior_votes": None,
        "conditions": [],
        "widest": None,
        "predicted_remaining": None,
        "closed_at": (
            study.main_closed_at.isoformat(timespec="seconds").replace("+00:00", "Z")
            if study.main_closed_at
            else None
        ),
        "closed_reason": study.main_closed_reason,
    }
    if row is None:
        return out
    posterior = Posterior.from_dict(row.posterior)
    names = dict(
        db.session.execute(
            select(Condition.id, Condition.name).where(Condition.id.in_(row.conditions))
        ).all()
    )
    widths = posterior.half_widths()
    centred = posterior.mean - posterior.mean.mean()
    out["posterior_votes"] = row.n_votes
    out["conditions"] = sorted(
        (
            {"condition": names[cid], "scale_jod": float(s), "half_width_jod": float(w)}
            for cid, s, w in zip(row.conditions, centred, widths, strict=True)
        ),
        key=lambda c: -c["scale_jod"],
    )
    out["widest"] = float(widths.max())
    remaining = []
    if config.stop_half_width is not None and row.n_votes > 0:
        ratio = out["widest"] / config.stop_half_width
        remaining.append(max(0, int(np.ceil(row.n_votes * ratio**2)) - votes))
    if config.vote_budget is not None:
        remaining.append(max(0, config.vote_budget - votes))
    if study.main_closed_at is not None:
        remaining = [0]
    out["predicted_remaining"] = min(remaining) if remaining else None
    return out
