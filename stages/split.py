"""Stage `split`: train / val / test qrels by group (conversation), with a leakage check."""

import click

from retrieval.dataset import load_beir, write_qrels
from retrieval.io import atomic_dir, write_json
from retrieval.split import LeakageError, split_by_group

from .common import METRICS_DIR, SPLIT_DIR, load_params, params_option, raw_dir, section


@click.command("split")
@params_option
def command(params_path: str) -> None:
    """Split queries by conversation so that no conversation is in two splits."""
    params = load_params(params_path)
    split_params = section(params, "split")
    dataset = load_beir(raw_dir(params))
    try:
        result = split_by_group(
            dataset.queries, dataset.qrels, test_split=section(params, "dataset").get("test_split", "test"),
            val_fraction=float(split_params["val_fraction"]), test_fraction=float(split_params["test_fraction"]),
            seed=int(split_params.get("seed", params.get("seed", 42))),
        )
    except (LeakageError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    with atomic_dir(SPLIT_DIR) as tmp:
        for name, qrels in result.qrels.items():
            write_qrels(qrels, tmp / f"{name}.tsv")
    write_json({**result.counts, "shared_groups": result.shared_groups, "dropped_for_leakage": result.dropped},
               METRICS_DIR / "split.json")
    click.echo(f"split: {result.counts}, shared groups {result.shared_groups}")
