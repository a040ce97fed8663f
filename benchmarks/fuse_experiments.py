"""Fuse runs of different experiments (e.g. a dense and a colbert `dvc exp run`) with RRF, choose the fusion on
validation, and report it on test against the best single system chosen the same way.

    python benchmarks/fuse_experiments.py --run bm25=WS1:bm25 --run dense=WS1:finetuned --run colbert=WS2:finetuned
        [--k 60] [--min-runs 2] [--out benchmarks/results/fuse_experiments.json]

WS is an experiment's workspace after `dvc repro` / `dvc exp apply` (a folder with data/runs/, written by the
evaluate stage: test runs in data/runs/<system>.trec, validation runs in data/runs/validation/<system>.trec) and
data/split/{test,val}.tsv; every workspace must hold the same split (checked: the qrels files must be identical),
so the runs answer the same queries. Every subset of at least ``--min-runs`` runs is fused with
``retrieval.fusion.rrf``; the subset with the best validation nDCG@10 is the chosen fusion, the run with the best
validation nDCG@10 the chosen single system; only then is test looked at: nDCG@10 of both, the paired difference
with its 95% bootstrap interval and the paired randomisation test's p. Every subset's test figure is listed too,
but choosing among them on test would be selection on test.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.dataset import read_qrels  # noqa: E402
from retrieval.fusion import rrf  # noqa: E402
from retrieval.io import write_json  # noqa: E402
from retrieval.metrics import evaluate, per_query  # noqa: E402
from retrieval.runs import read_trec_run  # noqa: E402
from retrieval.significance import bootstrap_ci, paired_randomization_test  # noqa: E402

METRIC = "ndcg_at_10"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=WORKSPACE:SYSTEM")
    parser.add_argument("--k", type=int, default=60)
    parser.add_argument("--min-runs", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/fuse_experiments.json")
    return parser.parse_args(argv)


def parse_run(spec: str) -> tuple[str, Path, str]:
    name, sep, rest = spec.partition("=")
    workspace, sep2, system = rest.rpartition(":")
    if not (sep and sep2 and name and workspace and system):
        raise SystemExit(f"--run {spec!r}: expected NAME=WORKSPACE:SYSTEM, e.g. dense=/tmp/exp:finetuned")
    return name, Path(workspace), system


def positive_qrels(path: Path) -> dict:
    return {q: grades for q, grades in read_qrels(path).items() if any(g > 0 for g in grades.values())}


def main(argv=None) -> None:
    args = parse_args(argv)
    specs = [parse_run(spec) for spec in args.run]
    digests = {}
    for _, workspace, _ in specs:
        for split in ("test", "val"):
            path = workspace / "data" / "split" / f"{split}.tsv"
            if not path.is_file():
                raise SystemExit(f"{path}: missing (run the pipeline in {workspace} first)")
            digests.setdefault(split, {})[str(workspace)] = hashlib.sha256(path.read_bytes()).hexdigest()
    for split, by_workspace in digests.items():
        if len(set(by_workspace.values())) > 1:
            raise SystemExit(f"the workspaces' data/split/{split}.tsv differ: their runs answer different queries")
    first = specs[0][1]
    qrels = {"test": positive_qrels(first / "data/split/test.tsv"), "val": positive_qrels(first / "data/split/val.tsv")}
    runs = {"test": {}, "val": {}}
    for name, workspace, system in specs:
        runs["test"][name] = read_trec_run(workspace / "data/runs" / f"{system}.trec")
        path = workspace / "data/runs/validation" / f"{system}.trec"
        if not path.is_file():
            raise SystemExit(f"{path}: missing (the evaluate stage writes validation runs since this benchmark)")
        runs["val"][name] = read_trec_run(path)

    names = [name for name, _, _ in specs]
    rows = []
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            if 1 < size < args.min_runs:
                continue
            row = {"runs": list(subset)}
            for split in ("val", "test"):
                run = runs[split][subset[0]] if size == 1 else rrf([runs[split][n] for n in subset], k=args.k)
                row[split] = evaluate(qrels[split], run, [METRIC])[METRIC]
                row[f"_{split}_run"] = run
            rows.append(row)
    singles = [r for r in rows if len(r["runs"]) == 1]
    fusions = [r for r in rows if len(r["runs"]) > 1]
    best_single = max(singles, key=lambda r: r["val"])
    best_fusion = max(fusions, key=lambda r: r["val"])
    a = per_query(qrels["test"], best_fusion["_test_run"], METRIC)
    b = per_query(qrels["test"], best_single["_test_run"], METRIC)
    low, high = bootstrap_ci(a, b)
    result = {
        "metric": METRIC, "rrf_k": args.k, "test_queries": len(qrels["test"]), "val_queries": len(qrels["val"]),
        "runs": {name: f"{workspace}:{system}" for name, workspace, system in specs},
        "chosen_on_validation": {
            "fusion": {"runs": best_fusion["runs"], "val": best_fusion["val"], "test": best_fusion["test"]},
            "single": {"runs": best_single["runs"], "val": best_single["val"], "test": best_single["test"]},
            "test_delta": best_fusion["test"] - best_single["test"], "ci95": [low, high],
            "p": paired_randomization_test(a, b)},
        "all": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    write_json(result, Path(args.out))
    for r in sorted(result["all"], key=lambda r: -r["val"]):
        print(f"{'+'.join(r['runs']):40s} val {r['val']:.4f}  test {r['test']:.4f}")
    chosen = result["chosen_on_validation"]
    print(f"chosen fusion {'+'.join(chosen['fusion']['runs'])}: test {chosen['fusion']['test']:.4f} vs "
          f"{'+'.join(chosen['single']['runs'])} {chosen['single']['test']:.4f}: {chosen['test_delta']:+.4f} "
          f"[{low:+.4f}, {high:+.4f}], p {chosen['p']:.4f}")


if __name__ == "__main__":
    main()
