"""What the cross-encoder stages cost on this machine, from a short sample, without running them in full.

    RETRIEVAL_DATA_MIRROR=../shared/datasets python benchmarks/reranker_cost.py [--dataset ../shared/datasets/scifact]

Times ``rerank.base_model`` (at ``rerank.max_length``) scoring --pairs (query, document) pairs, and --steps training
steps at ``rerank.train.batch_size``, then extrapolates to the rerank stage (test queries x top_k x 2 rerankers)
and to one epoch of train_reranker (its pairs from the mine stage's counts). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import yaml

from retrieval.dataset import doc_text, load_beir
from retrieval.hub import resolve_model
from retrieval.models.cross_encoder import load_cross_encoder, train_cross_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=None, help="BEIR folder (default: data/raw/<dataset.name>)")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/reranker_cost.json")
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    rerank, train = params["rerank"], params["rerank"]["train"]
    folder = Path(args.dataset or Path("data/raw") / params["dataset"]["name"])
    dataset = load_beir(folder)
    split = params["dataset"].get("test_split", "test")
    judged = [(q, d) for q, docs in dataset.qrels[split].items() for d in docs]
    doc_ids = list(dataset.corpus)
    # Each test query with its judged documents and other documents, as a reranker would see them.
    pairs = [(dataset.queries[q]["text"], doc_text(dataset.corpus[d if i % 2 == 0 else doc_ids[i % len(doc_ids)]]))
             for i, (q, d) in enumerate(judged * (args.pairs // max(len(judged), 1) + 1))][: args.pairs]

    model = load_cross_encoder(resolve_model(str(rerank["base_model"])), max_length=int(rerank["max_length"]))
    start = time.perf_counter()
    model.predict(pairs, batch_size=int(rerank["batch_size"]), show_progress_bar=False)
    pairs_per_second = len(pairs) / (time.perf_counter() - start)

    batch = int(train["batch_size"])
    per_row = 1 + int(train["negatives_per_positive"])
    # Rows of one positive and `negatives_per_positive` other documents, as train_reranker builds them.
    rows = [{"query": q, "positives": [p],
             "negatives": [pairs[(i + 7 + 6 * j) % len(pairs)][1] for j in range(per_row - 1)]}
            for i, (q, p) in enumerate(pairs[: args.steps * batch // per_row + 1])]
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        summary = train_cross_encoder(model, rows, Path(scratch) / "model", batch_size=batch,
                                      negatives_per_positive=int(train["negatives_per_positive"]))
        seconds_per_step = (time.perf_counter() - start) / summary["steps"]  # includes trainer set-up and saving

    test_queries, top_k = len(dataset.qrels[split]), int(rerank["top_k"])
    split_counts = Path("metrics/split.json")  # the split stage's counts: one training row per judged pair
    train_positives = json.loads(split_counts.read_text())["train"]["qrels"] if split_counts.exists() else None
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "model": rerank["base_model"], "max_length": rerank["max_length"],
        "pairs_per_second": pairs_per_second, "train_seconds_per_step": seconds_per_step,
        "rerank_stage_seconds_estimate": 2 * test_queries * top_k / pairs_per_second,
        "rerank_pairs": 2 * test_queries * top_k,
    }
    if train_positives:
        steps = -(-train_positives * per_row // batch)
        results.update(train_reranker_steps=steps, train_reranker_seconds_estimate=steps * seconds_per_step)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
