"""Split queries into train / val / test by group, so that no group (e.g. a conversation) spans two splits.

Turns of one conversation share context and often relevant documents; putting some in train and others in
test would leak test answers into training.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

SPLITS = ("train", "val", "test")


@dataclass
class SplitResult:
    qrels: dict[str, dict[str, dict[str, int]]]  # "train" / "val" / "test" -> qid -> doc_id -> grade
    counts: dict[str, dict[str, int]]  # split -> {"queries": n, "groups": n, "qrels": n}
    shared_groups: int  # groups appearing in more than one split (always 0 once returned)
    dropped: int  # training-pool queries dropped because their group is in the official test split
    official_test: str | None  # name of the official split kept as "test", None when test was carved


class LeakageError(RuntimeError):
    """A group has queries in more than one split."""


def query_group(query_id: str, query: dict) -> str:
    """The conversation a query belongs to, or the query itself when it stands alone."""
    conversation = query.get("conversation_id")
    return str(conversation) if conversation not in (None, "") else query_id


def split_by_group(
    queries: dict[str, dict],
    qrels_by_split: dict[str, dict[str, dict[str, int]]],
    *,
    test_split: str | None = "test",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 42,
) -> SplitResult:
    """Split the queries that have qrels into train / val / test by group.

    When ``test_split`` names an official split and other splits exist, it is kept as "test" and "val" is
    carved from the other splits' queries (minus those whose group is in test). Otherwise (no such split, or
    it is the only one, as for MTRAG) test and val are both carved from all groups.
    """
    for fraction_name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"{fraction_name} must be in [0, 1), got {fraction}")
    unknown = sorted({qid for split in qrels_by_split.values() for qid in split} - queries.keys())
    if unknown:
        raise ValueError(f"{len(unknown)} query ids in qrels are not in queries, e.g. {unknown[:5]}")

    keep_official = test_split in qrels_by_split and len(qrels_by_split) > 1
    test: dict[str, dict[str, int]] = {}
    pool: dict[str, dict[str, int]] = {}
    for split in sorted(qrels_by_split):  # sorted: merge order must not depend on dict order
        target = test if keep_official and split == test_split else pool
        for qid, docs in qrels_by_split[split].items():
            if docs:  # only queries with judgments are split
                target.setdefault(qid, {}).update(docs)

    dropped = 0
    if keep_official:
        test_groups = {query_group(qid, queries[qid]) for qid in test}
        kept = {qid: docs for qid, docs in pool.items() if query_group(qid, queries[qid]) not in test_groups}
        dropped, pool = len(pool) - len(kept), kept

    groups = sorted({query_group(qid, queries[qid]) for qid in pool})
    random.Random(seed).shuffle(groups)
    n_test = 0 if keep_official else _share(test_fraction, len(groups))
    n_val = _share(val_fraction, len(groups))
    n_train = len(groups) - n_test - n_val
    empty = [split for split, requested, n in (
        ("train", True, n_train),
        ("val", val_fraction > 0, n_val),
        ("test", True, len(test)) if keep_official else ("test", test_fraction > 0, n_test),
    ) if requested and n <= 0]
    if empty:
        if keep_official:
            test_note = f"official test {test_split!r} has {len(test)} queries ({dropped} others dropped for sharing its groups)"
        else:
            test_note = f"test_fraction={test_fraction} -> {n_test} groups"
        raise ValueError(
            f"split {', '.join(empty)} would be empty: {len(groups)} groups ({len(pool)} queries) to split, "
            f"val_fraction={val_fraction} -> {n_val} groups, {test_note}, leaving {n_train} groups for train"
        )

    split_of_group = {group: "test" for group in groups[:n_test]}
    split_of_group.update({group: "val" for group in groups[n_test:n_test + n_val]})
    result: dict[str, dict[str, dict[str, int]]] = {split: {} for split in SPLITS}
    for qid, docs in pool.items():
        result[split_of_group.get(query_group(qid, queries[qid]), "train")][qid] = docs
    if keep_official:
        result["test"] = test

    check_no_leakage(queries, result)
    counts = {
        split: {
            "queries": len(split_qrels),
            "groups": len({query_group(qid, queries[qid]) for qid in split_qrels}),
            "qrels": sum(len(docs) for docs in split_qrels.values()),
        }
        for split, split_qrels in result.items()
    }
    return SplitResult(result, counts, shared_groups=count_shared_groups(queries, result), dropped=dropped,
                       official_test=test_split if keep_official else None)


def _share(fraction: float, n_groups: int) -> int:
    """Groups for a split taking ``fraction``: at least one when asked for and there are >= 2 groups."""
    if fraction <= 0:
        return 0
    return max(round(fraction * n_groups), 1 if n_groups >= 2 else 0)


def _splits_by_group(queries: dict[str, dict], split_qrels: dict[str, dict]) -> dict[str, set[str]]:
    splits_of: dict[str, set[str]] = defaultdict(set)
    for split, qrels in split_qrels.items():
        for qid in qrels:
            splits_of[query_group(qid, queries.get(qid, {}))].add(split)
    return splits_of


def count_shared_groups(queries: dict[str, dict], split_qrels: dict[str, dict]) -> int:
    return sum(len(splits) > 1 for splits in _splits_by_group(queries, split_qrels).values())


def check_no_leakage(queries: dict[str, dict], split_qrels: dict[str, dict]) -> None:
    """Raise LeakageError when any group has queries in more than one split."""
    leaks = {g: sorted(s) for g, s in _splits_by_group(queries, split_qrels).items() if len(s) > 1}
    if leaks:
        shown = "; ".join(f"{group!r} in {', '.join(splits)}" for group, splits in sorted(leaks.items())[:10])
        more = f" (and {len(leaks) - 10} more)" if len(leaks) > 10 else ""
        raise LeakageError(f"{len(leaks)} groups appear in more than one split: {shown}{more}")
