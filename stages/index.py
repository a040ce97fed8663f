"""Stage `index`: encode the corpus with the baseline (base model) or the fine-tuned model into an index."""

import click

from retrieval.dataset import load_beir
from retrieval.io import atomic_dir, write_json
from retrieval.models import get_family
from retrieval.encoding import using_encoding

from .common import FINETUNED_MODEL, INDEX_DIRS, METRICS_DIR, load_params, params_option, raw_dir, section
from .encoding import encoding_for


@click.command("index")
@click.argument("which", type=click.Choice(sorted(INDEX_DIRS)))
@params_option
def command(which: str, params_path: str) -> None:
    """Index the corpus for WHICH system: baseline (the base model zero-shot) or finetuned."""
    params = load_params(params_path)
    family_name = str(section(params, "model"))
    family = get_family(family_name)
    if not family.TRAINABLE:
        with atomic_dir(INDEX_DIRS[which]) as tmp:
            write_json({"family": family_name, "note": "no model index: BM25 uses the Lucene index built by mine"},
                       tmp / "index.json")
        write_json({"num_docs": 0}, METRICS_DIR / f"index_{which}.json")
        return
    config = section(params, "models", family_name)
    model_ref = str(config["base_model"]) if which == "baseline" else str(FINETUNED_MODEL)
    dataset = load_beir(raw_dir(params))
    with using_encoding(encoding_for(params, family_name)):
        stats = family.build_index(model_ref, dataset.corpus, INDEX_DIRS[which], config)
    write_json(stats, METRICS_DIR / f"index_{which}.json")
    click.echo(f"index {which}: {stats}")
