"""Stage `synthesize`: with `train.source` synthetic or mixed, generate queries for a seeded sample of the corpus
(GPL), never from a test document when `synthesize.exclude_test_docs`, and mine hard negatives for them as the
mine stage does for labelled queries. The teacher_scores stage then pseudo-labels them with the cross-encoder and
train fits Margin-MSE on those margins."""

import click

from retrieval.dataset import load_beir, read_qrels
from retrieval.io import atomic_dir, write_json, write_jsonl

from .common import (METRICS_DIR, SPLIT_DIR, SYNTHESIS_CACHE, SYNTHETIC_DIR, load_params, params_option, raw_dir,
                     section, train_source, write_skip_note)

SYNTHESIZE_METRICS = METRICS_DIR / "synthesize.json"


@click.command("synthesize")
@params_option
def command(params_path: str) -> None:
    """Write data/synthetic/{queries,train}.jsonl: generated queries and their mined negatives."""
    params = load_params(params_path)
    source = train_source(params)
    SYNTHESIS_CACHE.parent.mkdir(parents=True, exist_ok=True)
    SYNTHESIS_CACHE.touch()  # a DVC output even when nothing is generated
    if source == "labelled":
        write_skip_note(SYNTHETIC_DIR, {"generated": False, "reason": "train.source is labelled in params.yaml"})
        write_json({"queries": 0}, SYNTHESIZE_METRICS)
        return
    from retrieval.synthesis import (SynthesisError, SynthesizeSettings, build_generator, check_no_held_out_documents,
                                     held_out_documents, round_trip_filter, sample_documents, synthesize_queries)

    from .mine import Miner

    try:
        settings = SynthesizeSettings.from_params(section(params, "synthesize"))
    except ValueError as error:
        raise click.ClickException(f"params.yaml {error}") from None
    seed = int(params.get("seed", 42))
    dataset = load_beir(raw_dir(params))
    test_qrels = read_qrels(SPLIT_DIR / "test.tsv", dataset.corpus.keys(), dataset.queries.keys())
    excluded = held_out_documents(dataset.corpus, test_qrels) if settings.exclude_test_docs else set()
    doc_ids = sample_documents(dataset.corpus, int(settings.documents), seed, exclude=excluded)
    try:
        generator = build_generator(settings, seed)
        click.echo(f"synthesize: {settings.queries_per_doc} queries for each of {len(doc_ids)} documents with "
                   f"{generator.identity} ({len(excluded)} test documents left out)")
        records, stats = synthesize_queries(dataset.corpus, doc_ids, generator,
                                            queries_per_doc=int(settings.queries_per_doc), seed=seed,
                                            cache_path=SYNTHESIS_CACHE, sampling=settings.sampling)
        checked = check_no_held_out_documents(records, excluded)
    except SynthesisError as error:
        raise click.ClickException(str(error)) from None
    miner = Miner(params, dataset.corpus)
    generated = len(records)
    if settings.round_trip_top_k and records:
        top_k = int(settings.round_trip_top_k)
        hits = miner.searcher.batch_search([r["query"] for r in records], [r["query_id"] for r in records], k=top_k,
                                           threads=miner.threads)
        records = round_trip_filter(records, hits, top_k)
    if not records:
        raise click.ClickException(f"synthesize: no usable query for {len(doc_ids)} documents ({stats.as_dict()}, "
                                   f"{generated} before the round-trip filter); check synthesize.{settings.generator}"
                                   " or loosen synthesize.round_trip_top_k")
    mined, mine_stats = miner.negatives({r["query_id"]: {r["doc_id"]: 1} for r in records},
                                        {r["query_id"]: r["query"] for r in records}, "synthetic")
    with atomic_dir(SYNTHETIC_DIR) as tmp:
        write_jsonl(records, tmp / "queries.jsonl")
        write_jsonl(mined, tmp / "train.jsonl")
        write_json({"generated": True, "generator": generator.identity, "settings": settings.as_dict()},
                   tmp / "info.json")
    # queries: what train gets; generated / kept / dropped_*: the generator's answers and what cleaning kept of them
    write_json({"queries": len(records), **stats.as_dict(), "dropped_round_trip": generated - len(records),
                "generator": generator.identity,
                "test_documents_excluded": len(excluded), "queries_checked_against_test_documents": checked,
                "mine": {"method": miner.method,
                         "avg_negatives": sum(len(r["negatives"]) for r in mined) / max(1, len(mined)),
                         **mine_stats}}, SYNTHESIZE_METRICS)
    click.echo(f"synthesize: {stats.as_dict()}")
