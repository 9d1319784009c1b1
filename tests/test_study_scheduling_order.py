"""The index-read scheduling order equals ordering every eligible item, on both databases.

``scheduling._lowest_load`` reads only the lowest-load items (level by level over the
load index, from a random start in draw-key order) and ``active.pair_counts`` groups an
index instead of every item; here both are compared with a brute force written from the
raw rows: every item's load (votes + open leases), sorted by ``(load, (draw_key - start)
mod DRAW_MOD)``, and per-pair sums over every item.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from study_app import active, scheduling
from study_app.extensions import db, read
from study_app.models import DRAW_MOD, Item, Participant, Study, Trial
from study_app.studies import parse_config

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _populated_study(app, tmp_path, k: int, seed: int):
    """A live study (4 conditions × 7 images = 42 items) with random votes per item, open,
    expired and answered leases of 5 other participants and preview leases; returns
    (study id, config, the id of a participant who was issued a few items)."""
    from tests.study_support import make_study, write_stimulus_set

    stimuli = write_stimulus_set(
        tmp_path / "set", n_images=7, conditions=("a", "b", "c", "d"), size=4
    )
    config = {
        "title": "Order",
        "slug": "order",
        "votes_per_item": k,
        "seed": seed,
        "catch_trials": 0,
        "repeat_trials": 0,
    }
    make_study(app, stimuli, **config)
    rng = random.Random(seed)
    with app.app_context():
        study = db.session.scalars(select(Study)).one()
        items = db.session.scalars(select(Item).where(Item.study_id == study.id)).all()
        for item in items:
            db.session.execute(
                update(Item).where(Item.id == item.id).values(n_votes=rng.randrange(k + 1))
            )
        people = []
        for p in range(6):
            person = Participant(
                study_id=study.id, public_id=f"o{p}", token=f"t{p:020d}", preview=p == 5
            )
            db.session.add(person)
            db.session.flush()
            people.append(person)
        for n, item in enumerate(rng.sample(items, 25)):
            person = people[n % 6]
            status, expires = rng.choice(
                [
                    ("leased", NOW + timedelta(seconds=60)),
                    ("leased", NOW - timedelta(seconds=1)),
                    ("released", NOW + timedelta(seconds=60)),
                    ("answered", NOW),
                ]
            )
            db.session.add(
                Trial(
                    token=f"tr{n:020d}",
                    study_id=study.id,
                    participant_id=person.id,
                    item_id=item.id,
                    kind="main",
                    image_id=item.image_id,
                    condition_left="a",
                    condition_right="b",
                    left_sha256="",
                    right_sha256="",
                    a_left=True,
                    preview=person.preview,
                    sequence=n,
                    status=status,
                    leased_at=NOW,
                    expires_at=expires,
                )
            )
        db.session.commit()
        return study.id, parse_config(config), people[0].id


def _reference(study_id: int, k: int, participant_id: int, start: int, pair=None) -> list[int]:
    """Every eligible item sorted by (load, draw rank), from the raw rows."""
    trials = db.session.scalars(select(Trial).where(Trial.study_id == study_id)).all()
    open_leases = Counter(
        t.item_id
        for t in trials
        if t.kind == "main" and not t.preview and t.status == "leased" and t.expires_at > NOW
    )
    taken = {t.item_id for t in trials if t.participant_id == participant_id}
    rows = []
    for item in db.session.scalars(select(Item).where(Item.study_id == study_id)):
        load = item.n_votes + open_leases[item.id]
        if item.id in taken or load >= k:
            continue
        if pair is not None and (item.condition_a_id, item.condition_b_id) != pair:
            continue
        rows.append((load, (item.draw_key - start) % DRAW_MOD, item.id))
    return [row[2] for row in sorted(rows)]


def test_the_index_read_order_is_the_full_lowest_load_order(db_app, tmp_path):
    k = 3
    study_id, config, pid = _populated_study(db_app, tmp_path, k, seed=11)
    with db_app.app_context():
        study = db.session.get(Study, study_id)
        person = db.session.get(Participant, pid)
        pairs = sorted(
            set(db.session.execute(select(Item.condition_a_id, Item.condition_b_id)).all())
        )
        starts = random.Random(3).sample(range(1, DRAW_MOD), 8)
        for start in starts:
            everything = _reference(study_id, k, pid, start)
            assert len(everything) > 5  # the setup leaves something to choose
            for want in (1, 3, len(everything) + 2):
                got = scheduling._lowest_load(person, study, config, NOW, want, start)
                assert got == everything[:want]
            pair = pairs[start % len(pairs)]
            in_pair = _reference(study_id, k, pid, start, pair)
            assert (
                scheduling._lowest_load(person, study, config, NOW, 4, start, pair=pair)
                == in_pair[:4]
            )
            # started at a lower bound of the pair's levels (the active design passes the
            # tallies' lowest free level): the same items
            lowest = {(a, b): low for a, b, _v, _f, low in active.pair_counts(
                study, config, pid)}
            for from_level in {0, lowest[pair]} - {None}:
                assert scheduling._lowest_load(person, study, config, NOW, 4, start,
                                               pair=pair, from_level=from_level) == in_pair[:4]
            skip = everything[:2]
            assert (
                scheduling._lowest_load(person, study, config, NOW, 3, start, exclude=skip)
                == everything[2:5]
            )
        eligible = len(_reference(study_id, k, pid, 1))
        for limit in (1, eligible - 1, eligible, eligible + 5):
            assert scheduling._count_free(person, study, config, NOW, limit) == min(limit, eligible)


def test_one_statement_reads_every_pairs_first_level_as_their_own_reads(db_app, tmp_path):
    """An active fetch reads its pairs' first level in one statement
    (``_read_first_levels``): the same rows as each pair's own first read, and the walk
    given them leases the same items as without them and as the full sort."""
    k = 3
    study_id, config, pid = _populated_study(db_app, tmp_path, k, seed=7)
    with db_app.app_context():
        study = db.session.get(Study, study_id)
        person = db.session.get(Participant, pid)
        lowest = {(a, b): low for a, b, _v, _f, low in active.pair_counts(
            study, config, pid, NOW)}
        pairs = [pair for pair, low in lowest.items() if low is not None]
        assert len(pairs) >= 3
        rng = random.Random(5)
        for _ in range(4):
            wanted = [(pair, rng.choice((1, 2, 4, 8)), rng.randrange(1, DRAW_MOD), lowest[pair])
                      for pair in rng.sample(pairs, 3)]
            got = scheduling._read_first_levels(person, study, config, NOW, wanted)
            for (pair, want, start, level), rows in zip(wanted, got, strict=True):
                params = dict(scheduling._free_params(person, study, config, NOW),
                              pair_a=pair[0], pair_b=pair[1], level=level, start=start,
                              limit=want)
                alone = read(scheduling._at_level(True, False, False), params).all()
                assert [tuple(row) for row in rows] == [tuple(row) for row in alone]
                walked = scheduling._lowest_load(person, study, config, NOW, want, start, pair,
                                                 from_level=level, first=rows)
                assert walked == scheduling._lowest_load(
                    person, study, config, NOW, want, start, pair, from_level=level)
                assert walked == _reference(study_id, k, pid, start, pair)[:want]


def test_pair_counts_equal_grouping_every_item(db_app, tmp_path):
    k = 2
    study_id, config, pid = _populated_study(db_app, tmp_path, k, seed=5)
    with db_app.app_context():
        study = db.session.get(Study, study_id)
        taken_ids = set(
            db.session.scalars(select(Trial.item_id).where(Trial.participant_id == pid))
        )
        expected: dict = defaultdict(lambda: [0, 0, None])
        for item in db.session.scalars(select(Item).where(Item.study_id == study_id)):
            entry = expected[(item.condition_a_id, item.condition_b_id)]
            entry[0] += item.n_votes
            if item.id not in taken_ids and item.n_votes < k:
                entry[1] += 1
                entry[2] = item.n_votes if entry[2] is None else min(entry[2], item.n_votes)
        got = {(a, b): [v, f, low] for a, b, v, f, low in active.pair_counts(study, config, pid)}
        assert got == dict(expected)
        assert active.study_pairs(study) == sorted(expected)  # the loose index scan
        assert active.study_condition_ids(study) == sorted({c for p in expected for c in p})
        mine = db.session.scalars(select(Item).where(Item.id.in_(taken_ids))).all()
        assert any(i.n_votes < k for i in mine)  # the participant's own items were taken off


def test_an_item_leased_between_the_two_reads_is_a_candidate_once(db_app, tmp_path):
    """On PostgreSQL the unleased and the leased reads see different commits: an item
    leased in between comes back from both. It must be offered once (twice would lease
    it twice in one fetch, past K). Simulated by handing in a leased read that lists the
    first unleased items."""
    study_id, config, pid = _populated_study(db_app, tmp_path, 3, seed=2)
    with db_app.app_context():
        study = db.session.get(Study, study_id)
        person = db.session.get(Participant, pid)
        first = scheduling._lowest_load(person, study, config, NOW, 4, 1, leased=[])
        rows = db.session.execute(
            select(
                Item.id, Item.n_votes, Item.draw_key, Item.condition_a_id, Item.condition_b_id
            ).where(Item.id.in_(first))
        ).all()
        seen_twice = [(i, n + 1, k, (a, b)) for i, n, k, a, b in rows]
        every = scheduling._lowest_load(person, study, config, NOW, 1000, 1, leased=[])
        got = scheduling._lowest_load(person, study, config, NOW, 1000, 1, leased=seen_twice)
        assert len(got) == len(set(got)) == len(every)
        assert set(got) == set(every)


def test_a_fetch_with_few_items_and_a_huge_k_reads_only_the_levels_that_exist(db_app, tmp_path):
    """K = 10⁶ and fewer free items than a batch wants: the fetch leases what there is in a
    handful of statements. (The level walk used to step through every level up to K, two
    statements each, so this fetch never returned.)"""
    from sqlalchemy import event

    from tests.study_support import Participant as ApiParticipant
    from tests.study_support import make_study, write_stimulus_set

    stimuli = write_stimulus_set(tmp_path / "set", n_images=2, conditions=("a", "b", "c"),
                                 size=4)
    slug = make_study(db_app, stimuli, votes_per_item=10**6, trials_per_participant=10,
                      batch_size=10, catch_trials=0, repeat_trials=0)
    first = ApiParticipant(db_app.test_client(), slug)
    leased = first.next().get_json()["trials"]
    assert len(leased) == 6  # 2 images × 3 pairs
    for trial in leased[:3]:  # three items at 1 vote, three still leased (load 1)
        assert first.vote(trial["token"]).status_code == 200
    statements = []
    with db_app.app_context():
        engine = db.engine

    def count(*_args) -> None:
        statements.append(1)

    event.listen(engine, "before_cursor_execute", count)
    try:
        second = ApiParticipant(db_app.test_client(), slug)
        trials = second.next().get_json()["trials"]
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(trials) == 6  # every item again (load 1 each, far under K)
    assert len(statements) < 60, len(statements)


def test_one_read_gives_the_pairs_and_their_open_leases(db_app, tmp_path, monkeypatch):
    """``active.read_pair_state`` reads the tallies, the participant's items and the open
    leases per item in one statement, the items' pairs from a per-process memo (one read
    of the items it has not seen); the open main leases per pair equal the raw rows'. And
    the leased items free for the participant (``scheduling._leased_free_items``) are the
    raw rows' too: not their own, not at K."""
    k = 3
    study_id, config, pid = _populated_study(db_app, tmp_path, k, seed=4)
    with db_app.app_context():
        study = db.session.get(Study, study_id)
        person = db.session.get(Participant, pid)
        # the participant's own open lease on an item far under K: leased, not free to them
        own = db.session.scalars(select(Item).where(Item.n_votes == 0)
                                 .where(Item.id.not_in(select(Trial.item_id))).limit(1)).one()
        db.session.add(Trial(token="own-open", study_id=study_id, participant_id=pid,
                             item_id=own.id, kind="main", image_id=own.image_id,
                             condition_left="a", condition_right="b", left_sha256="",
                             right_sha256="", a_left=True, preview=False, sequence=99,
                             status="leased", leased_at=NOW,
                             expires_at=NOW + timedelta(seconds=60)))
        db.session.commit()
        trials = db.session.scalars(select(Trial).where(Trial.study_id == study_id)).all()
        items = {i.id: i for i in db.session.scalars(select(Item))}
        open_leases = Counter(t.item_id for t in trials if t.kind == "main" and not t.preview
                              and t.status == "leased" and t.expires_at > NOW)
        per_pair = Counter()
        for item_id, count in open_leases.items():
            per_pair[items[item_id].condition_a_id, items[item_id].condition_b_id] += count
        taken = {t.item_id for t in trials if t.participant_id == pid}
        free = sorted((i, items[i].n_votes + n, items[i].draw_key,
                       (items[i].condition_a_id, items[i].condition_b_id))
                      for i, n in open_leases.items()
                      if i not in taken and items[i].n_votes + n < k)
        assert free and own.id in open_leases and own.id not in {row[0] for row in free}

        assert sorted(scheduling._leased_free_items(person, study, config, NOW)) == free

        sent = []
        monkeypatch.setattr(active, "read", lambda statement, params: sent.append(
            statement) or read(statement, params))
        for round_ in range(2):  # the second time, every item's pair is known
            sent.clear()
            state = active.read_pair_state(study, config, pid, NOW)
            assert {(a, b): n for a, b, n in state.open_per_pair} == dict(per_pair)
            assert state.per_pair == active.pair_counts(study, config, pid, NOW)
            assert (active._item_pairs_query() in sent) == (round_ == 0)
        # a process's own new leases are remembered when made: no read for them either
        active._item_pairs.clear()
        active.remember_pairs(study, [items[i] for i in open_leases])
        sent.clear()
        state = active.read_pair_state(study, config, pid, NOW)
        assert {(a, b): n for a, b, n in state.open_per_pair} == dict(per_pair)
        assert active._item_pairs_query() not in sent
        # the memo past its size: cleared, and this read still maps every item
        monkeypatch.setattr(active, "ITEM_PAIRS_KEPT", len(open_leases))
        active._item_pairs.clear()
        half = sorted(open_leases)[: len(open_leases) // 2]
        active.remember_pairs(study, [items[i] for i in half] + [
            next(i for i in items.values() if i.id not in open_leases)])
        state = active.read_pair_state(study, config, pid, NOW)
        assert {(a, b): n for a, b, n in state.open_per_pair} == dict(per_pair)
        assert len(next(iter(active._item_pairs.values()))) == len(open_leases) - len(half)


def test_the_free_item_reads_look_up_each_items_leases_whatever_the_statistics(
        postgres_url, tmp_path):
    """PostgreSQL, trial table never analyzed (a new deployment's first minutes): the
    reads of unleased items check each item's open leases by an index lookup. With
    ``NOT EXISTS`` the planner made it an anti join that read every open lease of the
    study for every item (0.6 ms per read at 360 open leases, growing with them)."""
    from flask_migrate import upgrade

    from study_app import create_app

    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": postgres_url})
    with app.app_context():
        upgrade()
    try:
        study_id, config, pid = _populated_study(app, tmp_path, 3, seed=4)
        with app.app_context():
            connection = db.session.connection()
            params = {"study_id": study_id, "participant_id": pid, "k": 3, "now": NOW,
                      "limit": 8, "level": 0, "start": 1, "pair_a": 1, "pair_b": 2}
            for statement in (scheduling._count_unleased(),
                              scheduling._at_level(True, False, False),
                              scheduling._at_level(False, False, True),
                              scheduling._lowest_level_above(False, False)):
                compiled = statement.compile(connection)
                cursor = connection.connection.driver_connection.cursor()
                cursor.execute("EXPLAIN " + str(compiled), compiled.construct_params(params))
                plan = "\n".join(row[0] for row in cursor.fetchall())
                assert "Anti Join" not in plan, plan
                assert "ix_trial_item_status" in plan, plan
    finally:
        with app.app_context():
            db.engine.dispose()


def test_the_new_trials_are_inserted_in_one_statement_as_rows_of_the_session(db_app, tmp_path):
    """``lease_trials`` inserts a fetch's trials without a unit-of-work flush; they are
    still the session's own rows: their ids are the stored rows' ids, in order, and a
    change to one is saved at the commit like any loaded row."""
    from sqlalchemy import inspect

    from study_app.transactions import run_write

    study_id, config, pid = _populated_study(db_app, tmp_path, 3, seed=6)
    with db_app.app_context():
        study = db.session.get(Study, study_id)
        before = set(db.session.scalars(select(Trial.id)))

        def lease():
            trials, _done = scheduling.lease_trials(pid, study, config, NOW)
            new = [t for t in trials if t.id not in before]
            assert new and all(inspect(t).persistent for t in new)
            assert all(db.session.get(Trial, t.id) is t for t in new)
            new[0].condition_left = "changed"
            return [(t.id, t.token, t.item_id) for t in new]

        made = run_write(lease)
        stored = db.session.execute(select(Trial.id, Trial.token, Trial.item_id)
                                    .where(Trial.id.not_in(before)).order_by(Trial.id)).all()
        assert [tuple(r) for r in stored] == sorted(made)
        assert db.session.get(Trial, made[0][0]).condition_left == "changed"


def test_the_leased_items_are_read_only_when_the_unleased_ones_do_not_settle_it(
        db_app, tmp_path):
    """An item with an open lease has load 1 or more: when the walk finds every wanted item
    at load 0, or the capped count reaches its limit on unleased items alone, the study's
    open leases are not read (a balanced fetch's costliest read with many participants
    online); otherwise they are, and the answer is the full order's either way."""
    k = 3
    study_id, config, pid = _populated_study(db_app, tmp_path, k, seed=11)
    with db_app.app_context():
        study = db.session.get(Study, study_id)
        person = db.session.get(Participant, pid)
        reads = []

        def leased():
            reads.append(1)
            return scheduling._leased_free_items(person, study, config, NOW)

        everything = _reference(study_id, k, pid, 1)
        votes = {i.id: i.n_votes for i in db.session.scalars(select(Item))}
        with_lease = {row[0] for row in scheduling._leased_free_items(person, study, config,
                                                                      NOW)}
        at_zero = sum(1 for i in everything if votes[i] == 0 and i not in with_lease)
        assert 0 < at_zero < len(everything) and with_lease
        assert scheduling._lowest_load(person, study, config, NOW, at_zero, 1,
                                       leased=leased) == everything[:at_zero]
        assert scheduling._count_free(person, study, config, NOW, at_zero,
                                      leased=leased) == at_zero
        assert reads == []
        assert scheduling._lowest_load(person, study, config, NOW, len(everything) + 2, 1,
                                       leased=leased) == everything
        assert reads == [1]
        assert scheduling._count_free(person, study, config, NOW, len(everything) + 2,
                                      leased=leased) == len(everything)
        assert reads == [1, 1]
        # wanting a few past load 0: the leased items at load 1 take their turn in key order
        for start in random.Random(5).sample(range(1, DRAW_MOD), 6):
            order = _reference(study_id, k, pid, start)
            for want in (at_zero + 1, at_zero + 3):
                assert scheduling._lowest_load(person, study, config, NOW, want, start,
                                               leased=leased) == order[:want]
