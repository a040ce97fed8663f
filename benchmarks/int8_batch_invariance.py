"""What batching costs an int8 ONNX encoder in consistency, and what encoding one text per call costs in speed.

    python benchmarks/int8_batch_invariance.py --threads 1 [--model sentence-transformers/all-MiniLM-L6-v2]
        [--dataset ../shared/datasets/scifact] [--docs 400] [--batch-size 32] [--repeats 2]
        [--out benchmarks/results/int8_batch_invariance.json]

Dynamic int8 quantisation takes one activation scale per input tensor, i.e. per batch. Consistency: every test
query is encoded (a) alone and (b) in batches of ``--batch-size`` in two orders (sorted ids, as evaluate batches
them, and reversed); reported: the largest 1 - cosine between a query's vectors in (a) and (b), and how many of the
queries' top-10 lists over the first ``--docs`` documents differ between the two batch orders. Speed: the first
``--docs`` corpus documents encoded in batches of ``--batch-size`` and one per call (``batch_size=1``), timed
round-robin ``--repeats`` times after a warm-up on one thread, best pass kept (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.backends import backend_record, load_sentence_transformer  # noqa: E402
from retrieval.dataset import doc_text, load_beir  # noqa: E402
from retrieval.io import write_json  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/datasets/scifact")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/int8_batch_invariance.json")
    return parser.parse_args(argv)


def encode(model, texts, batch_size):
    # sentence-transformers' own encode; batch_size 1 is what retrieval.models.dense.encode uses for int8.
    return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False,
                        normalize_embeddings=True).astype(np.float32)


def encode_in_order(model, texts, batch_size):
    """Batches taken in the given order (one encode call per batch), as a caller with fixed batches gets them."""
    return np.concatenate([encode(model, texts[i:i + batch_size], batch_size) for i in range(0, len(texts),
                                                                                              batch_size)])


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from retrieval.hub import resolve_model

    torch.set_num_threads(args.threads)
    model = load_sentence_transformer(resolve_model(args.model), backend="onnx", quantize="int8",
                                      threads=args.threads, device="cpu")
    model.max_seq_length = args.max_seq_length
    dataset = load_beir(args.dataset)
    qids = sorted(dataset.qrels["test"])
    queries = [dataset.queries[q]["text"] for q in qids]
    doc_ids = list(dataset.corpus)[:args.docs]
    docs = [doc_text(dataset.corpus[d]) for d in doc_ids]

    alone = encode(model, queries, 1)
    forward = encode_in_order(model, queries, args.batch_size)
    backward = encode_in_order(model, queries[::-1], args.batch_size)[::-1]
    doc_vectors = encode(model, docs, 1)

    def top10(vectors):
        return [tuple(np.argsort(-row, kind="stable")[:10]) for row in vectors @ doc_vectors.T]

    consistency = {
        "queries": len(qids),
        "max_1_minus_cos_alone_vs_sorted_batches": float(1 - np.min(np.sum(alone * forward, axis=1))),
        "max_1_minus_cos_sorted_vs_reversed_batches": float(1 - np.min(np.sum(forward * backward, axis=1))),
        "queries_whose_top10_differs_sorted_vs_reversed": int(sum(a != b for a, b in zip(top10(forward),
                                                                                          top10(backward)))),
        "queries_whose_top10_differs_alone_vs_alone": int(sum(a != b for a, b in zip(top10(alone),
                                                                                      top10(encode(model, queries,
                                                                                                   1))))),
    }

    encode(model, docs[:8], args.batch_size)  # warm-up
    best = {"batched": float("inf"), "one_per_call": float("inf")}
    for _ in range(args.repeats):
        for name, size in (("batched", args.batch_size), ("one_per_call", 1)):
            start = time.perf_counter()
            encode(model, docs, size)
            best[name] = min(best[name], time.perf_counter() - start)
    speed = {name: {"seconds": round(seconds, 2), "docs_per_s": round(len(docs) / seconds, 2)}
             for name, seconds in best.items()}
    speed["one_per_call_over_batched"] = round(best["batched"] / best["one_per_call"], 3)

    record = backend_record(model)
    result = {"model": args.model, "encoder": {k: record[k] for k in ("backend", "quantize", "variant", "sha256")},
              "threads": args.threads, "batch_size": args.batch_size, "docs": len(docs),
              "max_seq_length": args.max_seq_length, "consistency": consistency, "speed": speed,
              "cpu": os.uname().machine}
    write_json(result, Path(args.out))
    print(result)


if __name__ == "__main__":
    main()
