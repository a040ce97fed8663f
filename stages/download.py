"""Stage `download`: the dataset named in params into data/raw/<name>/ in BEIR layout, validated."""

import click

from retrieval.dataset import DataError
from retrieval.download import BEIR_URL, FetchError, fetch_dataset

from .common import load_params, params_option, raw_dir, section


@click.command("download")
@params_option
def command(params_path: str) -> None:
    """Fetch and validate the dataset (RETRIEVAL_DATA_MIRROR replaces the network)."""
    params = load_params(params_path)
    dataset_params = section(params, "dataset")
    try:
        if dataset_params.get("source") == "mtrag":  # dataset.name is mtrag-<domain>, e.g. mtrag-cloud
            from retrieval.mtrag import fetch_mtrag

            domain = str(dataset_params["name"]).removeprefix("mtrag-")
            dataset = fetch_mtrag(domain, raw_dir(params))
        else:
            dataset = fetch_dataset(
                str(dataset_params["name"]), str(dataset_params.get("source", "beir")), raw_dir(params),
                path=dataset_params.get("path"), url_template=dataset_params.get("url") or BEIR_URL,
                hf_repo=dataset_params.get("hf_repo"),
            )
    except (DataError, FetchError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    splits = ", ".join(f"{s}: {len(q)} queries" for s, q in sorted(dataset.qrels.items()))
    click.echo(f"{raw_dir(params)}: {len(dataset.corpus)} docs, {len(dataset.queries)} queries, qrels {splits}")
