"""Shared glue for stage entry points: params loading and the standard paths of the stage graph."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import yaml

params_option = click.option(
    "--params", "params_path", default="params.yaml", show_default=True, type=click.Path(exists=True, dir_okay=False),
    help="Parameters file (DVC's params.yaml).",
)


def load_params(path: str | Path = "params.yaml") -> dict:
    with open(path, encoding="utf-8") as stream:
        params = yaml.safe_load(stream) or {}
    if not isinstance(params, dict):
        raise click.ClickException(f"{path}: expected a mapping of parameters at the top level")
    return params


def section(params: dict, *keys: str):
    """params[k1][k2]...; a missing key is a clear error naming the params path."""
    value = params
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise click.ClickException(f"params.yaml: missing key {'.'.join(keys[: depth + 1])}")
        value = value[key]
    return value


def raw_dir(params: dict) -> Path:
    return Path("data/raw") / str(section(params, "dataset", "name"))


SPLIT_DIR = Path("data/split")
FORMATTED_QUERIES = Path("data/queries/queries.jsonl")
REWRITE_CACHE = Path("data/rewrites/cache.jsonl")
BM25_INDEX = Path("data/indexes/bm25")
NEGATIVES_DIR = Path("data/negatives")
# The base model's export for the encoding backend (stage `export`), reused by every experiment with the same base.
BASELINE_EXPORTS = Path("data/exports/baseline")
FINETUNED_MODEL = Path("data/models/finetuned")
CHECKPOINTS = Path("data/checkpoints")
INDEX_DIRS = {"baseline": Path("data/indexes/baseline"), "finetuned": Path("data/indexes/finetuned")}
RUNS_DIR = Path("data/runs")
RERANKER_MODEL = Path("data/models/reranker")
RERANKED_DIR = Path("data/reranked")
TEACHER_SCORES = Path("data/teacher_scores")
# Synthetic queries (stage `synthesize`, GPL) with their mined negatives, and the generator's answer cache.
SYNTHETIC_DIR = Path("data/synthetic")
SYNTHESIS_CACHE = Path("data/synthesis_cache/cache.jsonl")
TRAIN_SOURCES = ("labelled", "synthetic", "mixed")
METRICS_DIR = Path("metrics")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file this pipeline wrote itself (input data is validated by retrieval.dataset)."""
    import json

    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def read_formatted_queries() -> dict[str, str]:
    """Query id -> the text retrievers see, as written by the `queries` stage."""
    import json

    with open(FORMATTED_QUERIES, encoding="utf-8") as lines:
        return {r["_id"]: r["text"] for r in map(json.loads, filter(str.strip, lines))}


def write_skip_note(out_dir: Path, note: dict) -> None:
    """A stage switched off by params still writes its declared output folder, holding only ``info.json`` with
    ``note``, so the graph stays one graph and switching it on is one ``-S``."""
    from retrieval.io import atomic_dir, write_json

    with atomic_dir(out_dir) as tmp:
        write_json(note, tmp / "info.json")


def skip_reranking(out_dir: Path, metrics_path: Path) -> None:
    """With ``rerank.enabled: false`` the reranking stages write their outputs saying that they did not run."""
    from retrieval.io import write_json

    write_skip_note(out_dir, {"reranked": False, "reason": "rerank.enabled is false in params.yaml"})
    write_json({"reranked": 0}, metrics_path)


def reranking_skipped(out_dir: Path) -> bool:
    """Whether ``out_dir`` is :func:`skip_reranking`'s note rather than a real output."""
    import json

    info = out_dir / "info.json"
    return info.is_file() and json.loads(info.read_text(encoding="utf-8")).get("reranked") is False



def train_source(params: dict) -> str:
    """params ``train.source``: labelled (the split's training queries) | synthetic (generated queries only) |
    mixed (both)."""
    source = str(section(params, "train").get("source", "labelled"))
    if source not in TRAIN_SOURCES:
        raise click.ClickException(f"params.yaml train.source: unknown value {source!r}; use one of "
                                   f"{', '.join(TRAIN_SOURCES)}")
    return source


def distills(params: dict) -> bool:
    """Whether training is Margin-MSE on cross-encoder margins: asked for with ``train.distill``, and always with
    synthetic queries, whose only labels are the cross-encoder's (GPL's pseudo-labels)."""
    return bool(section(params, "train").get("distill")) or train_source(params) != "labelled"


def training_records(source: str) -> list[dict]:
    """The mined training records ({"query_id", "query", "positives", "negatives"}) of ``train.source``."""
    records = []
    if source in ("labelled", "mixed"):
        records += read_jsonl(NEGATIVES_DIR / "train.jsonl")
    if source in ("synthetic", "mixed"):
        path = SYNTHETIC_DIR / "train.jsonl"
        if not path.is_file():
            raise click.ClickException(f"{path} is missing: train.source {source} needs the synthesize stage's "
                                       "output (dvc repro synthesize)")
        records += read_jsonl(path)
    return records
