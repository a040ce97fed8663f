"""Synthetic-query generation on SciFact documents: queries per second of a generator backend on this machine, and
a sample of what it writes (for the README), on the same seeded sample the synthesize stage would draw.

    HF_HUB_OFFLINE=1 python benchmarks/synthesize_scifact.py --data ../shared/datasets/scifact --documents 40
    python benchmarks/synthesize_scifact.py --generator seq2seq --model doc2query/msmarco-t5-base-v1   # with the hub

Generation is single-stream (one document after another), as the stage runs it; --threads sets llama.cpp's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from retrieval.dataset import load_beir
from retrieval.synthesis import (SynthesizeSettings, build_generator, held_out_documents, sample_documents,
                                 synthesize_queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/datasets/scifact", help="BEIR folder (qrels/test.tsv excluded)")
    parser.add_argument("--generator", default="gguf", choices=["gguf", "seq2seq"])
    parser.add_argument("--model", default=None, help="generator model (default: the params.yaml default)")
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--queries-per-doc", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--show", type=int, default=8, help="sample queries printed with their documents")
    args = parser.parse_args()

    dataset = load_beir(Path(args.data))
    excluded = held_out_documents(dataset.corpus, dataset.qrels.get("test", {}))
    doc_ids = sample_documents(dataset.corpus, args.documents, args.seed, exclude=excluded)
    section = {"generator": args.generator, "sampling": {"temperature": args.temperature},
               args.generator: ({"threads": args.threads} if args.generator == "gguf" else {})}
    if args.model:
        section[args.generator]["model"] = args.model
    settings = SynthesizeSettings.from_params(section)
    began = time.perf_counter()
    generator = build_generator(settings, args.seed)
    load_seconds = time.perf_counter() - began
    records, stats = synthesize_queries(dataset.corpus, doc_ids, generator, queries_per_doc=args.queries_per_doc,
                                        seed=args.seed, sampling=settings.sampling)
    result = {"machine": platform.processor() or platform.machine(), "generator": generator.identity,
              "documents": len(doc_ids), "load_seconds": round(load_seconds, 2), **stats.as_dict(),
              "seconds_per_query": round(stats.seconds_generating / max(1, stats.generated_now), 3)}
    print(json.dumps(result, indent=2))
    print("\n| document (title) | generated query |\n|---|---|")
    for record in records[: args.show]:
        title = dataset.corpus[record["doc_id"]].get("title") or dataset.corpus[record["doc_id"]]["text"][:80]
        print(f"| {record['doc_id']}: {title} | {record['query']} |")


if __name__ == "__main__":
    main()
