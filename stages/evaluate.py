"""Stage `evaluate`: run the test queries through BM25, the baseline and the fine-tuned model, and fused (hybrid)
systems of those runs; write TREC runs (the validation queries' under data/runs/validation/) and
metrics/evaluate.json (with per-turn and per-field breakdowns when params ask for them, and every system's means on
the validation queries under ``validation``)."""

import json

import click

from retrieval.bm25 import BM25Searcher, hits_to_run
from retrieval.dataset import load_beir, read_qrels
from retrieval.encoding import using_encoding
from retrieval.evaluation import breakdown, compare_systems, group_queries, recall_curves
from retrieval.fusion import fuse_systems
from retrieval.io import atomic_dir, write_json
from retrieval.metrics import DEFAULT_METRICS, evaluate as evaluate_run
from retrieval.models import get_family
from retrieval.identity import summary as identity_summary
from retrieval.runs import write_trec_run

from .common import (BM25_INDEX, FINETUNED_MODEL, INDEX_DIRS, METRICS_DIR, RUNS_DIR, SPLIT_DIR,
                     load_params, params_option, raw_dir, read_formatted_queries, section)
from .encoding import encoding_for


def model_sources() -> dict:
    """What each system's encoder resolved to (hub, hub cache, packaged stand-in, local folder), the precision its
    index was encoded in, and for the fine-tuned model what its base resolved to, so that `dvc exp show` shows a
    stand-in for what it is."""
    sources = {}
    for system, index_dir in INDEX_DIRS.items():
        info = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
        sources[system] = identity_summary(info.get("encoder_identity"))
    lineage = FINETUNED_MODEL / "lineage.json"
    if lineage.is_file():
        record = json.loads(lineage.read_text(encoding="utf-8"))
        sources["finetuned"]["base"] = identity_summary(record.get("base"))
        sources["finetuned"]["kept"] = str(record.get("kept"))
    return sources


def validation_report(dataset, formatted: dict, system_runs, metrics: list[str]) -> tuple[dict | None, dict]:
    """Every system, hybrids included, on the validation queries (means only), and their runs: what defaults such
    as mine.method are chosen on, never the test split. The fine-tuned model was selected on these queries, so its
    figure is optimistic; the hybrid's is not what selected it."""
    path = SPLIT_DIR / "val.tsv"
    qrels = read_qrels(path, dataset.corpus.keys(), dataset.queries.keys()) if path.is_file() else {}
    qrels = {q: grades for q, grades in qrels.items() if any(g > 0 for g in grades.values())}
    if not qrels:
        return None, {}
    runs, hybrids = system_runs({q: formatted[q] for q in sorted(qrels)})
    runs = {**runs, **hybrids}
    means = {system: evaluate_run(qrels, run, metrics) for system, run in runs.items()}
    return {"num_queries": len(qrels), **means}, runs


def recall_rows(qrels, runs, depth: int) -> list[dict]:
    """Recall@k for k = 1..depth per system, as rows for `dvc plots` (one line per system, .dvc/plots/)."""
    cutoffs = range(1, depth + 1)
    return [{"system": system, "k": k, "recall": value}
            for system, curve in recall_curves(qrels, runs, cutoffs).items() for k, value in zip(cutoffs, curve)]


@click.command("evaluate")
@params_option
def command(params_path: str) -> None:
    """Evaluate every system on the test split."""
    params = load_params(params_path)
    evaluate, bm25 = section(params, "evaluate"), section(params, "bm25")
    depth = int(evaluate["depth"])
    metrics = list(evaluate.get("metrics") or DEFAULT_METRICS)
    dataset = load_beir(raw_dir(params))
    qrels = read_qrels(SPLIT_DIR / "test.tsv", dataset.corpus.keys(), dataset.queries.keys())
    qids = sorted(qrels)
    formatted = read_formatted_queries()
    queries = {q: formatted[q] for q in qids}

    searcher = BM25Searcher(BM25_INDEX, k1=float(bm25["k1"]), b=float(bm25["b"]))
    family_name = str(section(params, "model"))
    family = get_family(family_name)
    config = section(params, "models", family_name) if family.TRAINABLE else {}

    def system_runs(asked: dict[str, str]) -> tuple[dict, dict]:
        """Every system's run of ``asked`` ({qid: text}), and the hybrids fused from them."""
        ids = list(asked)
        runs = {"bm25": hits_to_run(searcher.batch_search([asked[q] for q in ids], ids, k=depth))}
        if family.TRAINABLE:
            # search checks that the encoder resolves to the weights each index was built with, and encodes the
            # queries in the precision the index records
            with using_encoding(encoding_for(params, family_name)):  # where the exports are (the index says which)
                for system, index_dir in INDEX_DIRS.items():
                    runs[system] = hits_to_run(family.search(index_dir, asked, depth, config))
        try:
            return runs, fuse_systems(runs, evaluate.get("fusion") or [])
        except ValueError as error:
            raise click.ClickException(f"params.yaml evaluate.fusion: {error}") from None

    runs, hybrids = system_runs(queries)
    runs.update(hybrids)
    comparisons = [("finetuned", "baseline")] if family.TRAINABLE else []
    if "finetuned" in runs:
        comparisons += [(name, "finetuned") for name in hybrids]

    report = compare_systems(qrels, runs, metrics=metrics, comparisons=comparisons)
    if family.TRAINABLE:
        report["models"] = model_sources()
    if family.TRAINABLE and hasattr(family, "query_stats"):  # e.g. SPLADE: active dimensions and index size
        for system, index_dir in INDEX_DIRS.items():
            info = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
            report[f"{system}_index"] = {**family.query_stats(index_dir, queries, config),
                                         **{k: v for k, v in info.items() if isinstance(v, (int, float))}}
    validation, validation_runs = validation_report(dataset, formatted, system_runs, metrics)
    if validation:
        report["validation"] = validation
    for field in evaluate.get("breakdowns") or []:
        groups = group_queries(dataset.queries, str(field))
        if groups:
            report[f"by_{field}"] = breakdown(qrels, runs, groups, metrics=metrics)
    def tag(system: str) -> str:
        return system if system == "bm25" or system in hybrids else f"{family_name}-{system}"

    # Validation runs too (data/runs/validation/), so runs of different experiments can be fused and the fusion
    # chosen on validation (benchmarks/fuse_experiments.py) without searching again.
    with atomic_dir(RUNS_DIR) as tmp:
        for system, run in runs.items():
            write_trec_run(run, tmp / f"{system}.trec", tag=tag(system))
        if validation_runs:
            (tmp / "validation").mkdir()
            for system, run in validation_runs.items():
                write_trec_run(run, tmp / "validation" / f"{system}.trec", tag=tag(system))
    write_json(report, METRICS_DIR / "evaluate.json")
    write_json(recall_rows(qrels, runs, depth), METRICS_DIR / "recall_at_k.json")
    for system in runs:
        click.echo(f"{system}: " + ", ".join(f"{m}={v:.4f}" for m, v in report[system].items()))
