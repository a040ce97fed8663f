"""Stage `train_reranker`: fine-tune the cross-encoder reranker on the mined hard negatives."""

import shutil

import click

from retrieval.dataset import doc_text, load_beir
from retrieval.io import write_json

from .common import (CHECKPOINTS, METRICS_DIR, NEGATIVES_DIR, RERANKER_MODEL, load_params, params_option, raw_dir,
                     read_jsonl, section, skip_reranking)

RERANKER_CHECKPOINTS = CHECKPOINTS / "reranker"


def reranker_rows(corpus: dict, records: list[dict]) -> list[dict]:
    """Mined records -> ``{"query", "positives": [text], "negatives": [text, in BM25 rank order]}``."""
    return [{"query": r["query"],
             "positives": [doc_text(corpus[p["doc_id"]]) for p in r["positives"]],
             "negatives": [doc_text(corpus[n["doc_id"]]) for n in sorted(r["negatives"], key=lambda n: n["rank"])]}
            for r in records]


@click.command("train_reranker")
@params_option
def command(params_path: str) -> None:
    """Fine-tune params `rerank.base_model` into data/models/reranker: the best of the base model and every epoch on
    validation nDCG@10 (`rerank.train.selection: trained`: the best epoch); an interrupted run resumes."""
    from retrieval.hub import resolve_model
    from retrieval.models.cross_encoder import load_cross_encoder, train_cross_encoder
    from retrieval.models.checkpoints import SELECTIONS

    params = load_params(params_path)
    rerank, train = section(params, "rerank"), section(params, "rerank", "train")
    if not rerank.get("enabled"):
        skip_reranking(RERANKER_MODEL, METRICS_DIR / "train_reranker.json")
        return
    corpus = load_beir(raw_dir(params)).corpus
    train_rows = reranker_rows(corpus, read_jsonl(NEGATIVES_DIR / "train.jsonl"))
    val_rows = reranker_rows(corpus, read_jsonl(NEGATIVES_DIR / "val.jsonl"))
    selection = str(train.get("selection", "validation"))
    if selection not in SELECTIONS:
        raise click.ClickException(f"params.yaml rerank.train.selection: expected one of {', '.join(SELECTIONS)}, "
                                   f"got {selection!r}")
    from retrieval.identity import loaded_with_identity, summary as identity_summary

    model, identity = loaded_with_identity(
        lambda: load_cross_encoder(resolve_model(str(rerank["base_model"])), max_length=int(rerank["max_length"])))
    summary = train_cross_encoder(
        model, train_rows, RERANKER_MODEL, loss=str(train["loss"]),
        negatives_per_positive=int(train["negatives_per_positive"]), group_size=int(train["group_size"]),
        epochs=int(train["epochs"]), batch_size=int(train["batch_size"]), lr=float(train["learning_rate"]),
        seed=int(params.get("seed", 42)), val_rows=val_rows or None, checkpoint_dir=RERANKER_CHECKPOINTS,
        checkpoint_steps=int(train["checkpoint_steps"]), selection=selection, precision=str(train["precision"]))
    # The model is saved (and DVC caches it): nothing is left to resume, and a finished run's last checkpoint would
    # otherwise make a rerun "resume" with no steps to run.
    shutil.rmtree(RERANKER_CHECKPOINTS, ignore_errors=True)
    write_json({"base": identity, "kept": summary.get("kept")}, RERANKER_MODEL / "lineage.json")
    write_json({**{k: v for k, v in summary.items() if isinstance(v, (int, float)) or k == "kept"},
                "base_model": identity_summary(identity)}, METRICS_DIR / "train_reranker.json")
    if summary["kept_base"]:
        click.echo(f"train_reranker: no epoch beat the base model on validation (nDCG@10 "
                   f"{summary['val_ndcg_at_10_base']:.4f} vs best epoch "
                   f"{max(summary['val_ndcg_at_10_epochs'], default=float('nan')):.4f}): the base model is kept "
                   "(rerank.train.selection: trained forces the trained one)")
    click.echo(f"train_reranker: {summary}")
