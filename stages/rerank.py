"""Stage `rerank`: rescore the top-k of a first-stage run (from evaluate) with the base and the fine-tuned
cross-encoder; write the reranked TREC runs and metrics/rerank.json in evaluate's layout."""

import json

import click

from retrieval.dataset import doc_text, load_beir, read_qrels
from retrieval.evaluation import compare_systems
from retrieval.io import atomic_dir, write_json
from retrieval.metrics import DEFAULT_METRICS, ranked
from retrieval.runs import read_trec_run, write_trec_run

from .common import (METRICS_DIR, RERANKED_DIR, RERANKER_MODEL, RUNS_DIR, SPLIT_DIR, load_params, params_option,
                     raw_dir, read_formatted_queries, section, skip_reranking)


@click.command("rerank")
@params_option
def command(params_path: str) -> None:
    """Rerank params `rerank.first_stage` (a run of the evaluate stage) with the baseline and fine-tuned rerankers."""
    from retrieval.hub import resolve_model
    from retrieval.identity import loaded_with_identity, summary as identity_summary
    from retrieval.models.cross_encoder import load_cross_encoder, rerank

    params = load_params(params_path)
    settings = section(params, "rerank")
    if not settings.get("enabled"):
        skip_reranking(RERANKED_DIR, METRICS_DIR / "rerank.json")
        return
    top_k = int(settings["top_k"])
    metrics = list(section(params, "evaluate").get("metrics") or DEFAULT_METRICS)
    # A preference list, so that one params file serves every family (model=bm25 has no hybrid run).
    preferences = settings["first_stage"] if isinstance(settings["first_stage"], list) else [settings["first_stage"]]
    available = sorted(p.stem for p in RUNS_DIR.glob("*.trec"))
    first_stage = next((str(name) for name in preferences if str(name) in available), None)
    if first_stage is None:
        raise click.ClickException(f"params.yaml rerank.first_stage: none of {preferences} is a run of the evaluate "
                                   f"stage (it wrote: {', '.join(available)})")
    run_path = RUNS_DIR / f"{first_stage}.trec"
    dataset = load_beir(raw_dir(params))
    qrels = read_qrels(SPLIT_DIR / "test.tsv", dataset.corpus.keys(), dataset.queries.keys())
    formatted = read_formatted_queries()
    queries = {q: formatted[q] for q in qrels}
    # Reranking only sees the first stage's top-k: it is cut there too, so every delta is about reordering alone.
    first = {qid: docs for qid, docs in read_trec_run(run_path).items() if qid in qrels}
    candidates = {doc for docs in first.values() for doc in ranked(docs)[:top_k]}
    texts = {doc: doc_text(dataset.corpus[doc]) for doc in candidates}

    runs = {"first_stage": {qid: {doc: docs[doc] for doc in ranked(docs)[:top_k]} for qid, docs in first.items()}}
    max_length, batch_size = int(settings["max_length"]), int(settings["batch_size"])
    # Full precision: bf16 logits (8 bits of mantissa) would turn close scores into ties.
    sources = {}
    for system, model_ref in (("baseline_reranker", str(settings["base_model"])),
                              ("finetuned_reranker", str(RERANKER_MODEL))):
        click.echo(f"rerank: {system} on the top {top_k} of {first_stage} for {len(queries)} queries")
        model, identity = loaded_with_identity(
            lambda: load_cross_encoder(resolve_model(model_ref), max_length=max_length))
        sources[system] = identity_summary(identity)
        runs[system] = rerank(model, queries, first, texts, top_k=top_k, batch_size=batch_size)
    lineage = RERANKER_MODEL / "lineage.json"
    if lineage.is_file():  # what the fine-tuned reranker started from, and whether training was kept
        record = json.loads(lineage.read_text(encoding="utf-8"))
        sources["finetuned_reranker"].update(base=identity_summary(record.get("base")), kept=str(record.get("kept")))

    report = compare_systems(qrels, runs, metrics=metrics, comparisons=[
        ("baseline_reranker", "first_stage"), ("finetuned_reranker", "first_stage"),
        ("finetuned_reranker", "baseline_reranker")])
    report["top_k"] = top_k
    report["models"] = sources
    with atomic_dir(RERANKED_DIR) as tmp:
        for system, run in runs.items():
            write_trec_run(run, tmp / f"{system}.trec", tag=f"{first_stage}-{system}")
    write_json(report, METRICS_DIR / "rerank.json")
    for system in runs:
        click.echo(f"{system}: " + ", ".join(f"{m}={v:.4f}" for m, v in report[system].items()))
