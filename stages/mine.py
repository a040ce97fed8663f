"""Stage `mine`: build the BM25 Lucene index and mine hard negatives for the train and val queries."""

import click

from retrieval.bm25 import BM25Searcher, build_bm25_index
from retrieval.dataset import load_beir, read_qrels
from retrieval.io import write_json, write_jsonl, atomic_dir
from retrieval.mining import mine_negatives

from .common import BM25_INDEX, METRICS_DIR, NEGATIVES_DIR, SPLIT_DIR, load_params, params_option, raw_dir, read_formatted_queries, section


@click.command("mine")
@params_option
def command(params_path: str) -> None:
    """Index the corpus with BM25 (kept for evaluation) and write hard negatives per query."""
    params = load_params(params_path)
    mine, bm25 = section(params, "mine"), section(params, "bm25")
    dataset = load_beir(raw_dir(params))
    queries = read_formatted_queries()
    build_bm25_index(dataset.corpus, BM25_INDEX, threads=int(mine.get("threads", 2)))
    searcher = BM25Searcher(BM25_INDEX, k1=float(bm25["k1"]), b=float(bm25["b"]))
    stats = {}
    with atomic_dir(NEGATIVES_DIR) as tmp:
        for split in ("train", "val"):
            qrels = read_qrels(SPLIT_DIR / f"{split}.tsv", dataset.corpus.keys(), dataset.queries.keys())
            qids = sorted(qrels)
            texts = {q: queries[q] for q in qids}
            results = searcher.batch_search([texts[q] for q in qids], qids, k=int(mine["depth"]),
                                            threads=int(mine.get("threads", 2)))
            records = mine_negatives(results, qrels, texts, rank_start=int(mine["rank_start"]),
                                     rank_end=int(mine["rank_end"]), count=int(mine["count"]),
                                     sample=bool(mine.get("sample", False)), seed=int(params.get("seed", 42)))
            write_jsonl(records, tmp / f"{split}.jsonl")
            stats[split] = {
                "queries": len(records),
                "avg_negatives": sum(len(r["negatives"]) for r in records) / max(1, len(records)),
            }
    write_json({"bm25_docs": searcher.num_docs, **stats}, METRICS_DIR / "mine.json")
    click.echo(f"mine: {stats}")
