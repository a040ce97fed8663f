"""Stage `generalize`: the baseline and the fine-tuned model scored with mteb on this run's test split and on other
collections (params ``generalize.datasets``), to show what fine-tuning did out of domain.

On the test split mteb's nDCG@10 must agree with metrics/evaluate.json within ``generalize.tolerance``: mteb is the
reference implementation of these metrics, so this cross-checks ours; on every collection mteb's figures are also
compared with our own exact search over the same vectors. Writes data/generalize (mteb's result files, the runs,
the collections as fetched), metrics/generalize.json (per collection: baseline, fine-tuned, delta, CI, p) and
metrics/generalize_plot.json (grouped bars, `dvc plots show`). A disagreement fails the stage after writing them.
"""

import json
from pathlib import Path

import click

from retrieval.dataset import DataError, Dataset, load_beir, read_qrels
from retrieval.download import FetchError, fetch_dataset
from retrieval.encoding import using_encoding
from retrieval.generalization import (Collection, GeneralizeSettings, compare_systems_on, dataset_from_mteb_task,
                                      score_collection)
from retrieval.io import atomic_dir, write_json
from retrieval.models import get_family
from retrieval.runs import write_trec_run
from retrieval.significance import holm_adjust

from .common import (INDEX_DIRS, METRICS_DIR, SPLIT_DIR, load_params, params_option, raw_dir,
                     read_formatted_queries, section)
from .encoding import encoding_for

GENERALIZE_DIR = Path("data/generalize")
SYSTEMS = ("baseline", "finetuned")


def fetch_collection(collection: Collection, out_dir: Path) -> Dataset:
    """The collection in BEIR layout under ``out_dir`` (kept with the stage's output, so what was scored is known)."""
    if collection.source == "mteb":
        from mteb import get_task

        try:
            task = get_task(collection.name)
        except KeyError as error:
            raise click.ClickException(f"params.yaml generalize.datasets: {collection.name!r} is not an mteb task "
                                       f"({error})") from None
        from retrieval.dataset import write_beir

        try:
            dataset = dataset_from_mteb_task(task, collection.split)
        except (RuntimeError, ValueError) as error:  # the hub unreachable, several subsets, no such split
            raise click.ClickException(f"params.yaml generalize.datasets {collection.name}: {error}") from None
        write_beir(dataset, out_dir)
        return dataset
    try:
        return fetch_dataset(collection.name, collection.source, out_dir, path=collection.path, progress=False)
    except (DataError, FetchError, ValueError) as error:  # bad lines name their file and line
        raise click.ClickException(f"params.yaml generalize.datasets {collection.name}: {error}") from None


def in_domain_check(scores: dict, evaluated: dict, tolerance: float, exact_index: bool) -> dict:
    """mteb's nDCG@10 on the test split against metrics/evaluate.json's, system by system."""
    check = {"tolerance": tolerance, "compared": exact_index}
    for system in SYSTEMS:
        theirs, ours = scores["systems"][system]["mteb"]["ndcg_at_10"], float(evaluated[system]["ndcg_at_10"])
        check[system] = {"mteb": theirs, "evaluate": ours, "difference": theirs - ours}
    # an approximate index (hnsw, ivfpq) may miss documents that mteb's exact search finds
    check["agrees"] = (not exact_index) or all(abs(check[s]["difference"]) <= tolerance for s in SYSTEMS)
    return check


def plot_rows(table: dict) -> list[dict]:
    return [{"dataset": name, "system": system, "ndcg_at_10": row[system]}
            for name, row in table.items() for system in SYSTEMS]


def write_runs(scores: dict, folder: Path, family_name: str) -> None:
    for system, result in scores["systems"].items():
        write_trec_run(result["run"], folder / f"{system}.trec", tag=f"{family_name}-{system}")


@click.command("generalize")
@params_option
def command(params_path: str) -> None:
    """Score baseline and fine-tuned with mteb on the test split and on other collections."""
    params = load_params(params_path)
    try:
        settings = GeneralizeSettings.from_params(params.get("generalize"))
    except ValueError as error:
        raise click.ClickException(f"params.yaml {error}") from None
    family_name = str(section(params, "model"))
    family = get_family(family_name)
    if not family.TRAINABLE or not hasattr(family, "embedder"):
        reason = (f"model family {family_name} has no vector encoder that mteb can run (families with one: dense, "
                  f"dpr)")
        with atomic_dir(GENERALIZE_DIR) as tmp:
            write_json({"skipped": reason}, tmp / "info.json")
        write_json({"skipped": reason}, METRICS_DIR / "generalize.json")
        write_json([], METRICS_DIR / "generalize_plot.json")
        click.echo(f"generalize skipped: {reason}")
        return

    config = section(params, "models", family_name)
    batch_size = int(config.get("encode_batch_size", 64))
    depth = int(section(params, "evaluate", "depth"))
    dataset_name = str(section(params, "dataset", "name"))
    dataset = load_beir(raw_dir(params))
    qrels = read_qrels(SPLIT_DIR / "test.tsv", dataset.corpus.keys(), dataset.queries.keys())
    formatted = read_formatted_queries()
    # as the evaluate stage asks them: the formatted texts in query id order (the same batches, the same vectors)
    test_split = Dataset(corpus=dataset.corpus, queries={q: {"text": formatted[q]} for q in sorted(qrels)},
                         qrels={"test": qrels})
    evaluated = json.loads((METRICS_DIR / "evaluate.json").read_text(encoding="utf-8"))
    exact_index = (config.get("faiss") or {}).get("kind", "flat") == "flat"

    table, collections = {}, {}
    with using_encoding(encoding_for(params, family_name)), atomic_dir(GENERALIZE_DIR) as tmp:
        embedders = {system: family.embedder(INDEX_DIRS[system], config) for system in SYSTEMS}
        click.echo(f"generalize: {dataset_name} test split ({len(qrels)} queries)")
        scores = score_collection(embedders, test_split, split="test", name=f"local-{dataset_name}-test",
                                  output_folder=tmp / "mteb", batch_size=batch_size, depth=depth,
                                  folder=raw_dir(params))
        check = in_domain_check(scores, evaluated, settings.tolerance, exact_index)
        key = f"{dataset_name} (test split)"
        table[key] = {**compare_systems_on(scores, tolerance=settings.tolerance), "in_domain": True}
        write_runs(scores, tmp / "runs" / dataset_name, family_name)
        for collection in settings.datasets:
            click.echo(f"generalize: {collection.name} ({collection.source})")
            other = fetch_collection(collection, tmp / "datasets" / collection.name)
            try:
                scores = score_collection(embedders, other, split=collection.split, name=f"local-{collection.name}",
                                          output_folder=tmp / "mteb", batch_size=batch_size, depth=depth,
                                          folder=tmp / "datasets" / collection.name)
            except ValueError as error:  # e.g. no qrels for the split
                raise click.ClickException(f"params.yaml generalize.datasets {collection.name}: {error}") from None
            table[collection.name] = {**compare_systems_on(scores, tolerance=settings.tolerance), "in_domain": False}
            collections[collection.name] = {"source": collection.source, "split": collection.split}
            write_runs(scores, tmp / "runs" / collection.name, family_name)
        # Holm over this file's comparisons (one per collection), as evaluate.json adjusts over its own
        adjusted = holm_adjust({name: row["p_value"] for name, row in table.items()})
        for name, row in table.items():
            row["p_unadjusted"], row["p_value"] = row["p_value"], adjusted[name]
        write_json({"collections": collections, "check": check}, tmp / "info.json")

    report = {"metric": "ndcg_at_10", "systems": list(SYSTEMS), "test_split_check": check, "datasets": table,
              "significance": {"test": "paired randomisation, two-sided", "correction": "holm over datasets",
                               "ci_level": 0.95}}
    write_json(report, METRICS_DIR / "generalize.json")
    write_json(plot_rows(table), METRICS_DIR / "generalize_plot.json")
    for name, row in table.items():
        click.echo(f"{name}: baseline {row['baseline']:.4f}, finetuned {row['finetuned']:.4f}, delta "
                   f"{row['delta']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}], p {row['p_value']:.4f}")

    problems = [f"{s}: mteb {check[s]['mteb']:.6f} vs evaluate.json {check[s]['evaluate']:.6f}"
                for s in SYSTEMS if not check["agrees"]]
    problems += [f"{name}: mteb and our exact search differ by {row['mteb_vs_ours_max_difference']:.2e}"
                 for name, row in table.items() if not row["mteb_agrees"]]
    if problems:
        raise click.ClickException("mteb disagrees with our metrics beyond generalize.tolerance "
                                   f"({settings.tolerance:g}): " + "; ".join(problems))
