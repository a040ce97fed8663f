import pytest

from retrieval.split import LeakageError, check_no_leakage, count_shared_groups, query_group, split_by_group


def conversations(n_conversations: int, turns: int = 3):
    """Queries "c<i>-t<j>" in conversations "c<i>", each judged against one document."""
    queries = {
        f"c{i}-t{j}": {"text": f"turn {j}", "conversation_id": f"c{i}", "turn": j}
        for i in range(n_conversations) for j in range(1, turns + 1)
    }
    return queries, {qid: {f"doc-{qid}": 1} for qid in queries}


def groups_by_split(queries, result):
    return {split: {query_group(qid, queries[qid]) for qid in qrels} for split, qrels in result.qrels.items()}


def test_query_group():
    assert query_group("q1", {"text": "x", "conversation_id": "c7"}) == "c7"
    assert query_group("q1", {"text": "x", "conversation_id": ""}) == "q1"
    assert query_group("q1", {"text": "x"}) == "q1"


def test_carves_all_splits_by_conversation():
    queries, qrels = conversations(30)
    result = split_by_group(queries, {"test": qrels}, val_fraction=0.1, test_fraction=0.2)
    groups = groups_by_split(queries, result)
    assert {split: len(g) for split, g in groups.items()} == {"train": 21, "val": 3, "test": 6}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    assert result.counts["test"] == {"queries": 18, "groups": 6, "qrels": 18}
    assert sum(c["queries"] for c in result.counts.values()) == 90
    assert result.dropped == 0 and result.official_test is None
    assert all(docs == qrels[qid] for split in result.qrels.values() for qid, docs in split.items())


def test_only_queries_with_qrels_are_split():
    queries, qrels = conversations(10, turns=1)
    queries["unjudged"] = {"text": "no qrels"}
    result = split_by_group(queries, {"test": qrels})
    assert "unjudged" not in {qid for split in result.qrels.values() for qid in split}
    assert sum(c["queries"] for c in result.counts.values()) == 10


def test_official_test_kept_and_leaking_train_queries_dropped():
    queries, qrels = conversations(12, turns=2)
    test = {qid: qrels[qid] for qid in ("c0-t1", "c0-t2", "c1-t1")}
    # c1-t2 is in train but its conversation c1 is in test: it must be dropped, not split.
    train = {qid: docs for qid, docs in qrels.items() if qid not in test}
    dev = {"c11-t1": {"extra": 2}}
    result = split_by_group(queries, {"test": test, "train": train, "dev": dev}, val_fraction=0.2)
    assert result.qrels["test"] == test
    assert result.official_test == "test"
    assert result.dropped == 1
    groups = groups_by_split(queries, result)
    assert groups["test"] == {"c0", "c1"}
    assert len(groups["val"]) == 2 and len(groups["train"]) == 8  # 10 pool groups, 20% to val
    assert not groups["train"] & groups["val"]
    merged = {**result.qrels["train"], **result.qrels["val"]}
    assert merged["c11-t1"] == {"doc-c11-t1": 1, "extra": 2}  # train and dev judgments are merged


def test_small_pool_still_gets_one_val_group():
    queries, qrels = conversations(3, turns=1)
    result = split_by_group(queries, {"test": {"c0-t1": qrels["c0-t1"]}, "train": {k: qrels[k] for k in ("c1-t1", "c2-t1")}})
    assert result.counts["val"]["groups"] == 1 and result.counts["train"]["groups"] == 1


def test_test_split_none_carves_from_all_splits():
    queries, qrels = conversations(20, turns=1)
    ids = list(qrels)
    result = split_by_group(queries, {"test": {k: qrels[k] for k in ids[:5]}, "train": {k: qrels[k] for k in ids[5:]}},
                            test_split=None)
    assert result.official_test is None
    assert {s: c["groups"] for s, c in result.counts.items()} == {"train": 14, "val": 2, "test": 4}


def test_deterministic_for_a_seed():
    queries, qrels = conversations(40)
    first = split_by_group(queries, {"test": qrels}, seed=7)
    assert split_by_group(queries, {"test": qrels}, seed=7) == first
    # Input order does not matter: groups are sorted before shuffling.
    shuffled = split_by_group(dict(reversed(queries.items())), {"test": dict(reversed(qrels.items()))}, seed=7)
    assert shuffled.qrels == first.qrels
    assert split_by_group(queries, {"test": qrels}, seed=8).qrels["test"].keys() != first.qrels["test"].keys()


@pytest.mark.parametrize("n_groups, kwargs, empty", [
    (2, {}, "train"),  # 1 group to test, 1 to val: nothing left to train on
    (1, {}, "val, test"),
    (5, {"test_fraction": 0.0, "val_fraction": 0.0}, None),
])
def test_empty_split_is_an_error(n_groups, kwargs, empty):
    queries, qrels = conversations(n_groups)
    if empty is None:
        result = split_by_group(queries, {"test": qrels}, **kwargs)
        assert result.counts["train"]["groups"] == 5 and not result.qrels["val"] and not result.qrels["test"]
        return
    with pytest.raises(ValueError, match=rf"split {empty} would be empty: {n_groups} groups \({3 * n_groups} queries\)"):
        split_by_group(queries, {"test": qrels}, **kwargs)


def test_empty_pool_with_official_test_is_an_error():
    queries, qrels = conversations(2)
    test = {k: v for k, v in qrels.items() if k.startswith("c0")}
    train = {k: {"other-doc": 1} for k in test}  # every training query is in a test conversation
    with pytest.raises(ValueError, match=r"split train, val would be empty: 0 groups .* \(3 others dropped"):
        split_by_group(queries, {"test": test, "train": train})


def test_unknown_query_in_qrels():
    queries, qrels = conversations(5)
    with pytest.raises(ValueError, match=r"1 query ids in qrels are not in queries, e.g. \['ghost'\]"):
        split_by_group(queries, {"test": {**qrels, "ghost": {"d": 1}}})


def test_leakage_check_on_crafted_split():
    queries, qrels = conversations(3, turns=2)
    leaky = {
        "train": {"c0-t1": qrels["c0-t1"], "c1-t1": qrels["c1-t1"], "c2-t1": qrels["c2-t1"]},
        "val": {"c2-t2": qrels["c2-t2"]},
        "test": {"c0-t2": qrels["c0-t2"]},
    }
    assert count_shared_groups(queries, leaky) == 2
    with pytest.raises(LeakageError, match=r"2 groups appear in more than one split: 'c0' in test, train; 'c2' in train, val"):
        check_no_leakage(queries, leaky)
    fixed = {"train": {k: v for k, v in qrels.items() if not k.startswith("c1")},
             "test": {k: v for k, v in qrels.items() if k.startswith("c1")}}
    assert count_shared_groups(queries, fixed) == 0
    check_no_leakage(queries, fixed)  # a clean split passes


def test_leakage_check_catches_one_standalone_query_in_two_splits():
    # Without a conversation the query is its own group: the same query id judged in train and test leaks.
    queries = {"q1": {"text": "a"}, "q2": {"text": "b"}, "q3": {"text": "c"}}
    leaky = {"train": {"q1": {"d1": 1}, "q2": {"d2": 1}}, "val": {}, "test": {"q2": {"d9": 1}, "q3": {"d3": 1}}}
    assert count_shared_groups(queries, leaky) == 1
    with pytest.raises(LeakageError, match=r"^1 groups appear in more than one split: 'q2' in test, train$"):
        check_no_leakage(queries, leaky)


def test_leakage_message_lists_the_first_ten_groups():
    # 12 conversations each with a turn in train and one in test. Groups sort as strings (c0 c1 c10 c11 c2 .. c9):
    # the ten shown end at c7, and c8, c9 are the 2 more.
    queries, qrels = conversations(12, turns=2)
    leaky = {"train": {k: v for k, v in qrels.items() if k.endswith("-t1")},
             "test": {k: v for k, v in qrels.items() if k.endswith("-t2")}}
    assert count_shared_groups(queries, leaky) == 12
    shown = "; ".join(f"'{g}' in test, train" for g in ["c0", "c1", "c10", "c11", "c2", "c3", "c4", "c5", "c6", "c7"])
    with pytest.raises(LeakageError, match=rf"^12 groups appear in more than one split: {shown} \(and 2 more\)$"):
        check_no_leakage(queries, leaky)
