"""Scheduling invariants, property-based: random studies and random sequences of
participants fetching, voting (also late and twice), finishing and time passing.

Every invariant is recomputed here from the raw trial and vote rows (an independent
reference), not read from the counters the scheduler maintains.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from study_app import scheduling
from study_app.errors import ApiError
from study_app.extensions import db
from study_app.models import (
    Condition,
    Image,
    Item,
    Participant,
    Stimulus,
    StimulusSet,
    Study,
    Trial,
    Vote,
)
from study_app.scheduling import VoteInput
from study_app.studies import create_study, parse_config
from study_app.transactions import run_write

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LEASE_S = 100


def _reset():
    for model in (Vote, Trial, Participant, Item, Study, Stimulus, Image, Condition,
                  StimulusSet):
        db.session.execute(delete(model))
    db.session.commit()


def _make_study(n_images, n_conditions, config):
    stimulus_set = StimulusSet(name="h", root="/nonexistent", manifest={}, manifest_sha256="0",
                               image_height=8, image_width=8, channels=3)
    db.session.add(stimulus_set)
    db.session.flush()
    conditions = [Condition(stimulus_set_id=stimulus_set.id, name=f"c{i}", info={})
                  for i in range(n_conditions)]
    images = [Image(stimulus_set_id=stimulus_set.id, key=f"i{i}", path=f"reference/i{i}.png",
                    sha256=f"{i:064x}") for i in range(n_images)]
    db.session.add_all(conditions + images)
    db.session.flush()
    db.session.add_all(
        Stimulus(stimulus_set_id=stimulus_set.id, image_id=im.id, condition_id=c.id,
                 path=f"{c.name}/{im.key}.png", sha256=f"{im.id:032x}{c.id:032x}")
        for im in images for c in conditions
    )
    db.session.flush()
    db.session.refresh(stimulus_set)
    study = create_study(stimulus_set, parse_config(config))
    study.status = "live"
    db.session.commit()
    return study


def _loads(study_id, now):
    """Votes + open leases per item, from the raw rows."""
    loads = Counter()
    for trial in db.session.scalars(select(Trial).where(Trial.study_id == study_id,
                                                        Trial.kind == "main")):
        if trial.status == "answered" or (trial.status == "leased" and trial.expires_at > now):
            loads[trial.item_id] += 1
    return loads


def _check_invariants(study, config, now, sides_exact):
    k = config.votes_per_item
    items = db.session.scalars(select(Item).where(Item.study_id == study.id)).all()
    trials = db.session.scalars(select(Trial).where(Trial.study_id == study.id)).all()
    votes = db.session.scalars(select(Vote)).all()
    by_trial = Counter(v.trial_id for v in votes)
    assert all(n == 1 for n in by_trial.values())
    answered = {t.id for t in trials if t.status == "answered"}
    assert set(by_trial) == answered
    loads = _loads(study.id, now)
    for item in items:
        main_votes = [t for t in trials if t.item_id == item.id and t.kind == "main"
                      and t.status == "answered"]
        assert len(main_votes) == item.n_votes <= k
        assert sum(1 for t in main_votes if t.a_left) == item.n_a_left
        assert loads[item.id] <= k
        if sides_exact:
            live = [t for t in trials if t.item_id == item.id and t.kind == "main"
                    and (t.status == "answered" or (t.status == "leased"
                                                    and t.expires_at > now))]
            a_left = sum(1 for t in live if t.a_left)
            assert abs(a_left - (len(live) - a_left)) <= 1
    per_participant = defaultdict(list)
    for trial in trials:
        per_participant[trial.participant_id].append(trial)
    for ptrials in per_participant.values():
        main_items = [t.item_id for t in ptrials if t.kind == "main"]
        assert len(main_items) == len(set(main_items)), "an item was issued twice to one person"
        counted = Counter(t.kind for t in ptrials
                          if t.status == "answered" or (t.status == "leased"
                                                        and t.expires_at > now))
        assert counted["main"] <= config.trials_per_participant
        assert counted["catch"] <= config.catch_trials
        assert counted["repeat"] <= config.repeat_trials
        by_id = {t.id: t for t in ptrials}
        for trial in ptrials:
            if trial.kind == "repeat":
                original = by_id[trial.repeat_of_id]
                assert original.status == "answered" and original.kind == "main"
                assert (trial.condition_left, trial.condition_right) == (
                    original.condition_right, original.condition_left)
            if trial.kind == "catch":
                assert trial.expected_condition in (trial.condition_left, trial.condition_right)
            if trial.kind == "main":
                item = db.session.get(Item, trial.item_id)
                names = {c.id: c.name for c in (item.condition_a, item.condition_b)}
                expected = (names[item.condition_a_id], names[item.condition_b_id])
                if not trial.a_left:
                    expected = expected[::-1]
                assert (trial.condition_left, trial.condition_right) == expected


OPS = st.one_of(
    st.tuples(st.just("start")),
    st.tuples(st.just("next"), st.integers(0, 5)),
    st.tuples(st.just("next"), st.integers(0, 5)),
    st.tuples(st.just("answer"), st.integers(0, 5), st.sampled_from(["left", "right"])),
    st.tuples(st.just("work"), st.integers(0, 5), st.sampled_from(["left", "right"])),
    st.tuples(st.just("work"), st.integers(0, 5), st.sampled_from(["left", "right"])),
    st.tuples(st.just("vote"), st.integers(0, 5), st.integers(0, 50),
              st.sampled_from(["left", "right"])),
    st.tuples(st.just("advance"), st.sampled_from([10, 60, 150])),
    st.tuples(st.just("finish"), st.integers(0, 5), st.sampled_from(["completed", "returned"])),
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    n_images=st.integers(2, 4), n_conditions=st.integers(2, 4), k=st.integers(1, 4),
    m=st.integers(2, 8), catch=st.integers(0, 2), repeat=st.integers(0, 2),
    batch=st.integers(1, 4), seed=st.integers(0, 10**6),
    n_participants=st.integers(2, 5),
    ops=st.lists(OPS, min_size=5, max_size=50),
)
def test_scheduling_invariants_hold_for_any_sequence_of_actions(
    app, n_images, n_conditions, k, m, catch, repeat, batch, seed, n_participants, ops
):
    config_dict = {"title": "H", "slug": "hypo", "votes_per_item": k, "trials_per_participant": m,
                   "catch_trials": catch, "repeat_trials": min(repeat, m), "batch_size": batch,
                   "lease_seconds": LEASE_S, "seed": seed}
    with app.app_context():
        _reset()
        study = _make_study(n_images, n_conditions, config_dict)
        config = parse_config(config_dict)
        now = T0
        participants: list[int] = []
        expired_any = False
        steps = []
        for op in [("start",)] * n_participants + ops:  # "work": fetch, then answer all
            if op[0] == "work":
                steps += [("next", op[1])] + [("answer", op[1], op[2])] * batch
            else:
                steps.append(op)
        for op in steps:
            study = db.session.get(Study, study.id)
            if op[0] == "start":
                participant = Participant(study_id=study.id, public_id=f"p{len(participants)}",
                                          token=f"token{len(participants):011d}xxxxxx",
                                          n_answered=0, n_issued=0)
                db.session.add(participant)
                db.session.commit()
                participants.append(participant.id)
            elif op[0] == "advance":
                now += timedelta(seconds=op[1])
                expired_any = True  # a lease may have lapsed
            elif not participants:
                continue
            elif op[0] == "next":
                pid = participants[op[1] % len(participants)]
                loads = _loads(study.id, now)
                mine = set(db.session.scalars(select(Trial.item_id).where(
                    Trial.participant_id == pid, Trial.kind == "main")))
                eligible = {i.id for i in db.session.scalars(
                    select(Item).where(Item.study_id == study.id))
                    if i.id not in mine and loads[i.id] < k}
                before = {t.id for t in db.session.scalars(
                    select(Trial).where(Trial.participant_id == pid))}
                try:
                    trials, done = run_write(
                        lambda pid=pid, study=study, now=now: scheduling.lease_trials(
                            pid, study, config, now))
                except ApiError as error:
                    assert error.code == "participant_finished"
                    continue
                assert len(trials) <= batch
                new_items = {t.item_id for t in trials if t.id not in before
                             and t.kind == "main"}
                assert new_items <= eligible
                rest = eligible - new_items
                if new_items and rest:  # fewest votes + open leases first
                    assert max(loads[i] for i in new_items) <= min(loads[i] for i in rest)
                if done:
                    remaining = scheduling.remaining_trials(
                        db.session.get(Participant, pid), study, config, now)
                    assert not any(remaining.values()) and not trials
            elif op[0] in ("vote", "answer"):
                pid = participants[op[1] % len(participants)]
                ptrials = db.session.scalars(select(Trial).where(
                    Trial.participant_id == pid).order_by(Trial.id)).all()
                if op[0] == "answer":  # the first open trial, as a page would
                    ptrials = [t for t in ptrials if t.status == "leased" and t.expires_at > now]
                if not ptrials:
                    continue
                trial = ptrials[op[2] % len(ptrials) if op[0] == "vote" else 0]
                op = (op[0], op[1], 0, op[-1])
                was = (trial.status, trial.expires_at)
                vote = VoteInput(trial.token, op[3], 500.0, now, now, 800, 600, 1.0)
                try:
                    stored, replayed = run_write(
                        lambda pid=pid, vote=vote, study=study, now=now: scheduling.record_vote(
                            pid, study, vote, True, now))
                except ApiError as error:
                    if error.code == "trial_expired":
                        assert was[0] == "released" or was[1] <= now
                    elif error.code == "vote_conflict":
                        assert was[0] == "answered"
                    else:
                        assert error.code == "participant_finished"
                else:
                    assert replayed == (was[0] == "answered")
                    assert was[0] == "answered" or was[1] > now
                    assert stored.choice == op[3]
            elif op[0] == "finish":
                pid = participants[op[1] % len(participants)]
                try:
                    run_write(lambda pid=pid, status=op[2], study=study, now=now: scheduling.finish(
                        pid, study, config, status, now))
                except ApiError as error:
                    assert error.code in ("trials_open", "trials_remaining",
                                          "participant_finished")
                if op[2] == "returned":
                    expired_any = True  # released leases
            db.session.expire_all()
            _check_invariants(study, config, now, sides_exact=not expired_any)


@pytest.mark.parametrize(("a_left", "b_left", "expected"), [(0, 1, True), (3, 1, False)])
def test_side_choice_prefers_the_less_shown_order(a_left, b_left, expected):
    import random

    assert scheduling.choose_a_left(a_left, b_left, random.Random(0)) is expected


def test_draw_kinds_never_exceeds_what_remains():
    import random

    rng = random.Random(1)
    for _ in range(200):
        remaining = {"main": rng.randint(0, 5), "catch": rng.randint(0, 2),
                     "repeat": rng.randint(0, 2)}
        kinds = scheduling.draw_kinds(rng.randint(0, 8), remaining, rng)
        counts = Counter(kinds)
        assert all(counts[k] <= remaining[k] for k in remaining)
        assert len(kinds) == min(len(kinds), sum(remaining.values()))
