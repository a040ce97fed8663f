"""Stage `mine`: build the BM25 Lucene index and mine hard negatives for the train and val queries."""

import click

from retrieval.bm25 import BM25Searcher, build_bm25_index
from retrieval.dataset import load_beir, read_qrels
from retrieval.io import write_json, write_jsonl, atomic_dir
from retrieval.mining import METHODS, DenseFilters, dense_negatives, interleave_negatives, mine_negatives

from .common import BM25_INDEX, METRICS_DIR, NEGATIVES_DIR, SPLIT_DIR, load_params, params_option, raw_dir, read_formatted_queries, section


class DenseMiner:
    """The dense family's base model (params ``models.dense``) on the ``encode`` backend. Its corpus vectors go
    through the embedding cache with the same key as index_baseline's, so a dense run encodes the corpus once."""

    def __init__(self, params: dict, corpus: dict) -> None:
        from retrieval.encoding import encoding_from_params
        from retrieval.models import dense

        config = section(params, "models", "dense")
        try:
            encoding = encoding_from_params(section(params, "encode"), exportable=True)
        except ValueError as error:
            raise click.ClickException(f"params.yaml {error}") from None
        self.dense, self.config = dense, config
        self.batch_size = int(config.get("encode_batch_size", 64))  # as build_index: one cache key
        self.model = dense.load_encoder(str(config["base_model"]), config, encoding)
        self.doc_ids = list(corpus)
        click.echo(f"mine: encoding {len(self.doc_ids)} documents with {config['base_model']} ({encoding.describe()})")
        self.doc_vectors = dense.encode_documents(self.model, [corpus[d] for d in self.doc_ids],
                                                  batch_size=self.batch_size)

    def query_vectors(self, texts: list[str]):
        # with models.dense.query_prefix, as search and validation encode queries
        return self.dense.encode_queries(self.model, texts, self.config, batch_size=self.batch_size)


class Miner:
    """Hard negatives for any set of judged queries with the mine params: BM25 over the mine stage's Lucene index,
    dense neighbours of the dense family's base model, or both (also used for the synthesize stage's queries)."""

    def __init__(self, params: dict, corpus: dict) -> None:
        mine, bm25 = section(params, "mine"), section(params, "bm25")
        self.method = str(mine.get("method", "bm25"))
        if self.method not in METHODS:
            raise click.ClickException(f"params.yaml mine.method: unknown value {self.method!r}; use one of "
                                       f"{', '.join(METHODS)}")
        try:
            self.filters = DenseFilters.from_params(mine.get("dense"))
        except ValueError as error:
            raise click.ClickException(f"params.yaml {error}") from None
        self.mine, self.seed = mine, int(params.get("seed", 42))
        self.count, self.sample = int(mine["count"]), bool(mine.get("sample", False))
        self.threads = int(mine.get("threads", 2))
        self.searcher = BM25Searcher(BM25_INDEX, k1=float(bm25["k1"]), b=float(bm25["b"]))
        self.dense = DenseMiner(params, corpus) if self.method != "bm25" else None

    def negatives(self, qrels: dict, texts: dict, what: str) -> tuple[list[dict], dict]:
        """One record per query of ``qrels`` (sorted ids) and the dense filters' counts; an error when no query
        kept a negative (training would fail later, and less clearly: the validators need one per query)."""
        qids = sorted(qrels)
        results = self.searcher.batch_search([texts[q] for q in qids], qids, k=int(self.mine["depth"]),
                                             threads=self.threads)
        records = mine_negatives(results, qrels, texts, rank_start=int(self.mine["rank_start"]),
                                 rank_end=int(self.mine["rank_end"]), count=self.count, sample=self.sample,
                                 seed=self.seed)
        stats = {}
        if self.dense is not None:
            dense_records, stats["dense"] = dense_negatives(
                self.dense.query_vectors([texts[q] for q in qids]), qids, self.dense.doc_vectors, self.dense.doc_ids,
                qrels, texts, filters=self.filters, count=self.count, sample=self.sample, seed=self.seed)
            records = dense_records if self.method == "dense" else interleave_negatives(dense_records, records,
                                                                                      self.count)
        if records and not any(r["negatives"] for r in records):
            raise click.ClickException(
                f"mine: no {what} query kept a hard negative with mine.method {self.method} ({stats or 'bm25'});"
                " widen mine.rank_end or loosen mine.dense (relative_margin, absolute_margin, max_score)")
        return records, stats


@click.command("mine")
@params_option
def command(params_path: str) -> None:
    """Index the corpus with BM25 (kept for evaluation) and write hard negatives per query."""
    params = load_params(params_path)
    mine = section(params, "mine")
    dataset = load_beir(raw_dir(params))
    queries = read_formatted_queries()
    build_bm25_index(dataset.corpus, BM25_INDEX, threads=int(mine.get("threads", 2)))
    miner = Miner(params, dataset.corpus)
    stats = {}
    with atomic_dir(NEGATIVES_DIR) as tmp:
        for split in ("train", "val"):
            qrels = read_qrels(SPLIT_DIR / f"{split}.tsv", dataset.corpus.keys(), dataset.queries.keys())
            records, split_stats = miner.negatives(qrels, {q: queries[q] for q in qrels}, split)
            write_jsonl(records, tmp / f"{split}.jsonl")
            stats[split] = {
                "queries": len(records),
                "avg_negatives": sum(len(r["negatives"]) for r in records) / max(1, len(records)),
                **split_stats,
            }
    write_json({"method": miner.method, "bm25_docs": miner.searcher.num_docs, **stats}, METRICS_DIR / "mine.json")
    click.echo(f"mine: {stats}")
