"""Plans: deterministic units, contiguous near-equal shards, clear refusals."""

import pytest

from common.errors import UserError
from common.plan import Plan, WorkUnit, make_plan


def units(n):
    return [WorkUnit(f"u{i}", {"i": i}) for i in range(n)]


def test_split_is_contiguous_near_equal_and_covers_every_unit():
    plan = make_plan("run", "job", units(10), 3)
    assert [len(s) for s in plan.shards] == [4, 3, 3]
    assert [u for shard in plan.shards for u in shard] == [f"u{i}" for i in range(10)]
    assert plan.shard_units(1) == [WorkUnit("u4", {"i": 4}), WorkUnit("u5", {"i": 5}), WorkUnit("u6", {"i": 6})]


def test_plan_round_trips_through_json(tmp_path):
    plan = make_plan("run", "job", units(5), 2)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan


@pytest.mark.parametrize(("text", "why"), [('{"run_id": "run", "job', "JSONDecodeError: Unterminated string"),
                                          ('{"run_id": "run"}', "KeyError: 'job'")])
def test_a_damaged_plan_file_says_how_to_recover(tmp_path, text, why):
    (tmp_path / "plan.json").write_text(text)
    with pytest.raises(UserError) as refused:
        Plan.load(tmp_path / "plan.json")
    assert str(refused.value).startswith(f"{tmp_path / 'plan.json'} is damaged ({why}")
    assert (f"saebatch does not write a run's plan again: restore the file from a backup, or move {tmp_path} aside "
            "and submit its manifest again to start the run afresh") in str(refused.value)


def test_more_shards_than_units_is_refused():
    with pytest.raises(UserError, match=r"run\.shards is 4 but the manifest has only 3 work unit\(s\); set run\.shards to at most 3"):
        make_plan("run", "job", units(3), 4)


def test_no_units_and_bad_ids_are_refused():
    with pytest.raises(UserError, match="no work units"):
        make_plan("run", "job", [], 1)
    with pytest.raises(UserError, match="unique; repeated: a"):
        make_plan("run", "job", [WorkUnit("a"), WorkUnit("a")], 1)
    with pytest.raises(UserError, match="no '/'"):
        make_plan("run", "job", [WorkUnit("a/b")], 1)


def test_every_repeated_id_among_many_units_is_named_once():
    """Found in one count (population_patching plans some 229k units, which a scan per id took
    minutes to check)."""
    many = units(50_000) + [WorkUnit("u7"), WorkUnit("u12345"), WorkUnit("u7")]
    with pytest.raises(UserError, match="unique; repeated: u12345, u7$"):
        make_plan("run", "job", many, 1)
