"""Latency of `retrieval explore`'s search on a real workspace: every test query answered one at a time as the app
answers it (BM25, baseline, fine-tuned, the hybrids, nDCG@10 and the results' HTML), median and p95.

    HF_HUB_OFFLINE=1 python benchmarks/explorer_latency.py --workspace /path/to/a/repro-ed/repo

The workspace is only read (the script changes into it because the stages' paths are relative); run `dvc repro`
there first. Also reports how often the explorer's top 10 is the evaluate stage's (data/runs/*.trec). BM25 agrees
exactly. The int8 ONNX encoders do not, query by query: dynamic quantisation takes its activation scale from the
whole batch (padding included), so a query encoded alone, as the app encodes it, gets a slightly different vector
than in evaluate's batches of 32 (sorted query ids). ``same_top10_in_evaluate_batches`` encodes the test queries in
evaluate's order and batches through the same loaded searchers: there they must agree exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(fraction * len(ordered) + 0.5)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=".", help="a workspace where `dvc repro` has run (read only)")
    parser.add_argument("--params", default="params.yaml", help="its params file, relative to the workspace")
    parser.add_argument("--repeat", type=int, default=1, help="passes over the test queries")
    args = parser.parse_args()

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.chdir(Path(args.workspace).resolve())  # stage paths (data/..., metrics/...) are relative to the workspace
    from retrieval.explorer import results_html
    from retrieval.metrics import per_query, ranked
    from retrieval.runs import read_trec_run
    from stages.common import RUNS_DIR, load_params
    from stages.explore import load_explorer

    started = time.perf_counter()
    explorer = load_explorer(load_params(args.params))
    load_seconds = time.perf_counter() - started
    queries = explorer.test_queries
    explorer.search(next(iter(queries.values())))  # first call: lazy allocations, not a query's cost

    latencies, results = [], {}
    for _ in range(args.repeat):
        for qid, text in queries.items():
            started = time.perf_counter()
            result = explorer.search(text, qid)
            results_html(result)
            latencies.append(time.perf_counter() - started)
            results[qid] = result

    report = json.loads(Path("metrics/evaluate.json").read_text(encoding="utf-8"))
    agreement = {}
    for system in explorer.systems.names:
        path = RUNS_DIR / f"{system}.trec"
        if not path.is_file():
            continue
        stored = read_trec_run(path)
        same = sum([h.doc_id for h in results[q].rankings[system]] == ranked(stored.get(q, {}))[:10] for q in queries)
        live = {q: {h.doc_id: h.score for h in results[q].rankings[system]} for q in queries}
        mean = statistics.fmean(per_query(explorer.qrels, live, "ndcg_at_10").values())
        agreement[system] = {"same_top10": same, "queries": len(queries), "ndcg_at_10_live": round(mean, 4),
                             "ndcg_at_10_evaluate": round(report.get(system, {}).get("ndcg_at_10", float("nan")), 4)}
        if system in explorer.systems.indexes:  # the same searcher, given evaluate's batches
            from retrieval.encoding import using_encoding

            in_order = {q: queries[q] for q in sorted(queries)}
            with using_encoding(explorer.systems.encoding):
                batched = explorer.systems.indexes[system](in_order, explorer.systems.depth)
            agreement[system]["same_top10_in_evaluate_batches"] = sum(
                [doc for doc, _ in batched[q][:10]] == ranked(stored.get(q, {}))[:10] for q in queries)

    milliseconds = [1000 * s for s in latencies]
    print(json.dumps({
        "workspace": str(Path.cwd()), "systems": explorer.systems.names, "queries": len(queries),
        "timed_searches": len(latencies), "load_seconds": round(load_seconds, 1),
        "latency_ms": {"median": round(statistics.median(milliseconds), 1),
                       "p95": round(percentile(milliseconds, 0.95), 1), "max": round(max(milliseconds), 1),
                       "mean": round(statistics.fmean(milliseconds), 1)},
        "cpu_threads": os.cpu_count(), "agreement_with_evaluate_runs": agreement,
    }, indent=2))


if __name__ == "__main__":
    sys.exit(main())
