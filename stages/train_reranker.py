"""Stage `train_reranker`: fine-tune the cross-encoder reranker on the mined hard negatives."""

import click

from retrieval.dataset import doc_text, load_beir
from retrieval.io import write_json

from .common import (METRICS_DIR, NEGATIVES_DIR, RERANKER_MODEL, load_params, params_option, raw_dir, read_jsonl,
                     section, skip_reranking)


def reranker_rows(corpus: dict, records: list[dict]) -> list[dict]:
    """Mined records -> ``{"query", "positives": [text], "negatives": [text, in BM25 rank order]}``."""
    return [{"query": r["query"],
             "positives": [doc_text(corpus[p["doc_id"]]) for p in r["positives"]],
             "negatives": [doc_text(corpus[n["doc_id"]]) for n in sorted(r["negatives"], key=lambda n: n["rank"])]}
            for r in records]


@click.command("train_reranker")
@params_option
def command(params_path: str) -> None:
    """Fine-tune params `rerank.base_model` into data/models/reranker (best validation epoch kept)."""
    from retrieval.hub import resolve_model
    from retrieval.models.cross_encoder import load_cross_encoder, train_cross_encoder

    params = load_params(params_path)
    rerank, train = section(params, "rerank"), section(params, "rerank", "train")
    if not rerank.get("enabled"):
        skip_reranking(RERANKER_MODEL, METRICS_DIR / "train_reranker.json")
        return
    corpus = load_beir(raw_dir(params)).corpus
    train_rows = reranker_rows(corpus, read_jsonl(NEGATIVES_DIR / "train.jsonl"))
    val_rows = reranker_rows(corpus, read_jsonl(NEGATIVES_DIR / "val.jsonl"))
    model = load_cross_encoder(resolve_model(str(rerank["base_model"])), max_length=int(rerank["max_length"]))
    summary = train_cross_encoder(
        model, train_rows, RERANKER_MODEL, loss=str(train["loss"]),
        negatives_per_positive=int(train["negatives_per_positive"]), group_size=int(train["group_size"]),
        epochs=int(train["epochs"]), batch_size=int(train["batch_size"]), lr=float(train["learning_rate"]),
        seed=int(params.get("seed", 42)), val_rows=val_rows or None)
    write_json({k: v for k, v in summary.items() if isinstance(v, (int, float))}, METRICS_DIR / "train_reranker.json")
    click.echo(f"train_reranker: {summary}")
