"""Where MNRL's scale fits the SPECTER2 family's scores: the base model's own loss on training batches.

    dvc repro mine      # the mined negatives this reads
    HF_HUB_OFFLINE=1 python benchmarks/specter2_mnrl_scale.py --base-model sentence-transformers/all-MiniLM-L6-v2 \
        --fresh-adapters

Encodes --rows training queries, their positives and first BM25 negatives with ``models.specter2`` (offline: a
BERT-like base with fresh adapters), scores batches of --batch-size queries against their positives and negatives
as the MNRL loss does, and prints for each similarity the mean score to the positive, first negative and other
in-batch documents, the loss at a few scales and the scale where it is lowest (one JSON line per similarity). The
README's SPECTER2 reading quotes these figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # stages/ without installing

from retrieval.dataset import load_beir  # noqa: E402
from retrieval.models import specter2  # noqa: E402
from retrieval.models.st_training import calibrated_mnrl_scale, mnrl_loss, mnrl_score_batches  # noqa: E402
from stages.common import NEGATIVES_DIR, raw_dir, read_jsonl  # noqa: E402
from stages.train import training_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=None, help="models.specter2.base_model (default: params.yaml's)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh-adapters", action="store_true",
                        help="freshly initialised adapters instead of params' (which offline cannot be loaded)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = yaml.safe_load(Path(args.params).read_text())
    config = dict(params["models"]["specter2"])
    if args.fresh_adapters:
        config.update(query_adapter=None, document_adapter=None)
    base_model = args.base_model or config["base_model"]
    dataset = load_beir(raw_dir(params))
    examples = training_data(dataset.corpus, read_jsonl(NEGATIVES_DIR / "train.jsonl"), []).examples
    examples = [example for example in examples if example["negatives"]]
    columns = {"query": [e["query"] for e in examples], "positive": [e["positive"] for e in examples],
               "negative_1": [e["negatives"][0] for e in examples]}
    for similarity in ("l2", "cosine"):
        torch.manual_seed(args.seed)  # the same fresh adapters for both similarities
        encoder = specter2.load(base_model, {**config, "similarity": similarity})
        batches = list(mnrl_score_batches(
            lambda queries: torch.tensor(encoder.encode_queries(queries)),
            lambda docs: torch.tensor(encoder.encode_documents(docs)),
            encoder.scores, columns, args.batch_size, max_rows=args.rows, seed=args.seed))
        to_positive = torch.cat([batch.diagonal() for batch in batches])
        to_negative = torch.cat([batch[:, batch.shape[0]:].diagonal() for batch in batches])
        in_batch = torch.cat([batch[:, : batch.shape[0]][~torch.eye(batch.shape[0], dtype=torch.bool)]
                              for batch in batches])
        best = calibrated_mnrl_scale(batches)
        losses = {f"{scale:g}": round(sum(mnrl_loss(b, scale) for b in batches) / len(batches), 3)
                  for scale in (1.0, 5.0, 20.0, best)}
        print(json.dumps({
            "similarity": similarity, "base_model": base_model, "rows": sum(batch.shape[0] for batch in batches),
            "positive": [round(float(to_positive.mean()), 3), round(float(to_positive.std()), 3)],
            "first_negative": round(float(to_negative.mean()), 3), "in_batch": round(float(in_batch.mean()), 3),
            "best_scale": round(best, 3), "loss_at_scale": losses,
        }))


if __name__ == "__main__":
    main()
