"""Stage `teacher_scores`: with `train.distill` (and always for synthetic queries, `train.source` synthetic or
mixed: GPL's pseudo-labels), score the training queries' positives and hard negatives with the cross-encoder (the fine-tuned reranker when the reranking stages are enabled, else the base reranker) for the
train stage's Margin-MSE."""

import click

from retrieval.dataset import load_beir
from retrieval.io import atomic_dir, write_json, write_jsonl

from .common import (RERANKER_MODEL, TEACHER_SCORES, distills, load_params, params_option, raw_dir, reranking_skipped,
                     section, train_source, training_records, write_skip_note)


def teacher_model_ref(params: dict) -> str:
    """The fine-tuned reranker if train_reranker trained one, else params `rerank.base_model`."""
    from retrieval.hub import resolve_model

    if reranking_skipped(RERANKER_MODEL):
        return str(resolve_model(str(section(params, "rerank", "base_model"))))
    return str(RERANKER_MODEL)


@click.command("teacher_scores")
@params_option
def command(params_path: str) -> None:
    """Write data/teacher_scores/train.jsonl: cross-encoder scores of each training query's positives and negatives."""
    params = load_params(params_path)
    train = section(params, "train")
    if not distills(params):
        write_skip_note(TEACHER_SCORES, {"scored": False, "reason": "train.distill is false in params.yaml (and "
                                                                    "train.source is labelled)"})
        return
    from retrieval.distillation import score_records
    from retrieval.models.cross_encoder import load_cross_encoder, score_pairs

    rerank = section(params, "rerank")
    teacher = teacher_model_ref(params)
    model = load_cross_encoder(teacher, max_length=int(rerank["max_length"]))
    corpus = load_beir(raw_dir(params)).corpus
    source = train_source(params)
    records = training_records(source)
    click.echo(f"teacher_scores: scoring {len(records)} training queries with {teacher}")
    scored = score_records(lambda pairs: score_pairs(model, pairs, batch_size=int(rerank["batch_size"])),
                           records, corpus, int(train["negatives_per_query"]))
    with atomic_dir(TEACHER_SCORES) as tmp:
        write_jsonl(scored, tmp / "train.jsonl")
        write_json({"scored": True, "teacher": teacher, "source": source, "queries": len(scored),
                    "pairs": sum(len(r["scores"]) for r in scored)}, tmp / "info.json")
