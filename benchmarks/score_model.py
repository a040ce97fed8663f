"""Score one model of any family on the validation and test queries against the whole corpus.

    dvc repro split queries          # the split and formatted queries this reads
    HF_HUB_OFFLINE=1 python benchmarks/score_model.py --family specter2 --model data/models/finetuned \
        --set base_model=sentence-transformers/all-MiniLM-L6-v2

The train stage's validation ranks only the validation positives and their BM25 candidates (a few hundred
documents), so a model can improve there and still lose on the whole corpus; this builds the family's own index
of every document (as the index stage does, in a temporary folder) and prints nDCG@10 and Recall@20 of the
validation and test claims as one JSON line (also appended to --out). --model is a saved model folder (e.g. one
restored from an experiment with ``dvc exp apply``) or the base model id for the zero-shot figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # stages/ without installing

from retrieval.bm25 import hits_to_run  # noqa: E402
from retrieval.dataset import load_beir, read_qrels  # noqa: E402
from retrieval.metrics import evaluate  # noqa: E402
from retrieval.models import get_family  # noqa: E402
from retrieval.precision import inference_precision  # noqa: E402
from stages.common import SPLIT_DIR, raw_dir, read_formatted_queries  # noqa: E402


def parse_setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected key=value")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, help="a model family (params.yaml `model`)")
    parser.add_argument("--model", required=True, help="saved model folder or base model id")
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="override a models.<family> setting (as dvc exp run -S models.<family>.KEY=VALUE)")
    parser.add_argument("--precision", default=None, help="encode.precision (default: params.yaml's)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="benchmarks/results/score_model.jsonl")
    args = parser.parse_args()

    params = yaml.safe_load(Path(args.params).read_text())
    family = get_family(args.family)
    if not family.TRAINABLE:
        parser.error(f"{args.family} has no model to score")
    config = {**params["models"][args.family], **dict(args.set)}
    precision = args.precision or str(params["encode"]["precision"])
    dataset = load_beir(raw_dir(params))
    formatted = read_formatted_queries()
    start = time.time()
    result: dict = {"family": args.family, "model": args.model, "settings": dict(args.set), "precision": precision}
    with tempfile.TemporaryDirectory() as tmp, inference_precision(precision):
        index_dir = Path(tmp) / "index"
        result["index"] = family.build_index(args.model, dataset.corpus, index_dir, config)
        for split in ("val", "test"):
            qrels = read_qrels(SPLIT_DIR / f"{split}.tsv", dataset.corpus.keys(), dataset.queries.keys())
            queries = {q: formatted[q] for q in sorted(qrels)}
            run = hits_to_run(family.search(index_dir, queries, 100, config))
            scores = evaluate(qrels, run, ["ndcg_at_10", "recall_at_20"])
            result[split] = {"queries": len(qrels), **{k: round(v, 4) for k, v in scores.items()}}
    result["seconds"] = round(time.time() - start, 1)
    line = json.dumps(result)
    print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as out:
        out.write(line + "\n")


if __name__ == "__main__":
    main()
