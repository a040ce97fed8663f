"""Stage `train`: fine-tune the model family chosen by params `model` on the mined triplets."""

import shutil

import click

from retrieval.dataset import load_beir
from retrieval.encoding import Encoding, index_encoding, using_encoding
from retrieval.io import atomic_dir, write_json
from retrieval.models import FAMILIES, get_family
from retrieval.models.base import TrainingData, TrainSettings

from .common import (CHECKPOINTS, FINETUNED_MODEL, INDEX_DIRS, METRICS_DIR, NEGATIVES_DIR, TEACHER_SCORES, distills,
                     load_params, params_option, raw_dir, read_jsonl, section, train_source, training_records)
from .encoding import encoding_for

TRAIN_CURVES = METRICS_DIR / "train"
# Settings under `train` shared by every family (dvc.yaml's train stage lists each); the seed is the top-level one.
SHARED_SETTINGS = tuple(name for name in TrainSettings.__dataclass_fields__ if name != "seed") + ("source",)


def training_data(corpus: dict, train_records: list[dict], val_records: list[dict], *, validation_corpus="all",
                  seed: int = 42, precision: str = "fp32") -> TrainingData:
    """One example per (query, positive); validation retrieves over the whole corpus, or over a seeded sample of
    ``validation_corpus`` documents that holds every validation positive and its mined BM25 candidates."""
    from retrieval.models.validation import check_sample_size, validation_corpus as sample_corpus

    examples = [
        {"query_id": r["query_id"], "query": r["query"], "positive_id": p["doc_id"], "positive": corpus[p["doc_id"]],
         "negative_ids": [n["doc_id"] for n in r["negatives"]], "negatives": [corpus[n["doc_id"]] for n in r["negatives"]]}
        for r in train_records for p in r["positives"]
    ]
    val_qrels = {r["query_id"]: {p["doc_id"]: p["grade"] for p in r["positives"]} for r in val_records if r["positives"]}
    positives = {d for docs in val_qrels.values() for d in docs}
    candidates = positives | {n["doc_id"] for r in val_records for n in r["negatives"]}
    try:
        check_sample_size(validation_corpus, len(positives))
        documents = sample_corpus(corpus, candidates, validation_corpus, seed=seed)
    except ValueError as error:
        raise click.ClickException(f"params.yaml train.{error}") from None
    return TrainingData(
        examples=examples,
        val_queries={r["query_id"]: r["query"] for r in val_records if r["query_id"] in val_qrels},
        val_corpus=documents,
        val_qrels=val_qrels,
        precision=precision,
    )


def shared_training_settings(params: dict) -> TrainSettings:
    """The shared settings under ``train``; any other key must be a family's section.

    An unknown key is an error, not ignored: a typo such as ``train.epoch`` would otherwise train with the default
    and, being outside the params dvc.yaml tracks, would not even rerun the stage."""
    train_params = section(params, "train")
    unknown = sorted(key for key in train_params if key not in SHARED_SETTINGS and key not in FAMILIES)
    if unknown:
        raise click.ClickException(
            f"params.yaml: unknown {', '.join(f'train.{key}' for key in unknown)}: the shared training settings are "
            f"{', '.join(SHARED_SETTINGS)}; train.<family> ({', '.join(sorted(FAMILIES))}) holds one family's own")
    settings = TrainSettings(**{key: train_params[key] for key in SHARED_SETTINGS
                                if key in train_params and key != "source"})
    settings.seed = int(params.get("seed", settings.seed))
    # synthetic queries have no labels but the cross-encoder's: they always train with Margin-MSE (GPL)
    settings.distill = distills(params)
    return settings


def family_training_config(params: dict, family_name: str) -> dict:
    """The family's model section (``models.<family>``) plus its training settings (``train.<family>``).

    Training-only settings live under ``train`` so that the index and evaluate stages, which depend on
    ``models.<family>``, are not rerun when only they change. A key set in both places is an error rather than a
    silent choice between them."""
    model_config = dict(section(params, "models", family_name) or {})
    training = section(params, "train").get(family_name) or {}
    if not isinstance(training, dict):
        raise click.ClickException(f"params.yaml train.{family_name}: expected a mapping of training settings")
    both = sorted(set(model_config) & set(training))
    if both:
        raise click.ClickException(
            f"params.yaml: {', '.join(f'models.{family_name}.{key}' for key in both)} "
            f"{'is a training setting' if len(both) == 1 else 'are training settings'}: set "
            f"{', '.join(f'train.{family_name}.{key}' for key in both)} instead")
    return {**model_config, **training}


def baseline_validation_run(family, config: dict, data: TrainingData, corpus_size: int) -> dict | None:
    """The base model's validation run, read off the baseline index (index_baseline encoded the corpus with the very
    base model and precision validation would use): one corpus encoding saved. Only when that search is the one
    validation does: the whole corpus, searched exactly (an approximate faiss kind would score the base unfairly);
    ``search`` checks the index's encoder identity, so a stale index fails instead of scoring another model."""
    import json

    info_path = INDEX_DIRS["baseline"] / "index.json"
    if len(data.val_corpus) != corpus_size or not info_path.is_file():
        return None
    info = json.loads(info_path.read_text(encoding="utf-8"))
    built, validating = index_encoding(info), data.encoding or Encoding(precision=data.precision)
    same_encoding = (built.backend, built.quantize, built.precision) == (validating.backend, validating.quantize,
                                                                          data.precision)
    if info.get("kind", "flat") != "flat" or not same_encoding:
        return None
    hits = family.search(INDEX_DIRS["baseline"], data.val_queries, 100, config)
    return {qid: dict(doc_hits) for qid, doc_hits in hits.items()}


@click.command("train")
@params_option
def command(params_path: str) -> None:
    """Fine-tune params `model` (a family in retrieval.models) and save it to data/models/finetuned."""
    params = load_params(params_path)
    family_name = str(section(params, "model"))
    family = get_family(family_name)
    settings = shared_training_settings(params)  # checked for every family, so a typo fails even under bm25
    from dvclive import Live

    if not family.TRAINABLE:
        # Not a fake model: a folder that says there is nothing to fine-tune, so later stages know.
        summary = {"family": family_name, "trained": False, "reason": f"{family_name} has no trainable parameters"}
        with atomic_dir(FINETUNED_MODEL) as tmp:
            write_json(summary, tmp / "training.json")
        write_json({"trained": 0}, METRICS_DIR / "train.json")
        # The declared curve outputs exist but are empty, so no other family's curves are left behind.
        live = Live(dir=str(TRAIN_CURVES), save_dvc_exp=False, dvcyaml=False)
        live.summary = {"trained": 0}
        live.end()
        (TRAIN_CURVES / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
        click.echo(summary["reason"])
        return

    from transformers.integrations import DVCLiveCallback

    from retrieval.identity import loaded_with_identity, summary as identity_summary

    dataset = load_beir(raw_dir(params))
    encoding = encoding_for(params, family_name)
    source = train_source(params)
    data = training_data(dataset.corpus, training_records(source), read_jsonl(NEGATIVES_DIR / "val.jsonl"),
                         validation_corpus=settings.validation_corpus, seed=settings.seed, precision=encoding.precision)
    data.encoding = encoding
    if not data.val_qrels:
        raise click.ClickException("no validation queries with positives: the train stage selects on validation "
                                   "(check split.val_fraction and the mine stage's data/negatives/val.jsonl)")
    with using_encoding(encoding):
        data.base_run = baseline_validation_run(family, section(params, "models", family_name), data,
                                                len(dataset.corpus))
    if settings.distill:
        if not getattr(family, "DISTILLABLE", False):
            raise click.ClickException(f"params.yaml train.distill: the {family_name} family has no Margin-MSE "
                                       "training (dense and splade have); set train.distill to false"
                                       + (" and train.source to labelled (synthetic queries train with Margin-MSE)"
                                          if source != "labelled" else ""))
        from retrieval.distillation import attach_teacher_scores

        teacher = {r["query_id"]: r["scores"] for r in read_jsonl(TEACHER_SCORES / "train.jsonl")}
        data.examples = attach_teacher_scores(data.examples, teacher)
    live = Live(dir=str(TRAIN_CURVES), save_dvc_exp=False, dvcyaml=False)
    # Every resolution made while training (the base model, adapters) is the trained model's lineage.
    summary, identity = loaded_with_identity(lambda: family.train(
        family_training_config(params, family_name), data, FINETUNED_MODEL, settings,
        checkpoint_dir=CHECKPOINTS / family_name, callbacks=[DVCLiveCallback(live=live)],
    ))
    live.end()
    write_json({"base": identity, "kept": summary.get("kept")}, FINETUNED_MODEL / "lineage.json")
    # The model is saved (and DVC caches it): nothing is left to resume, and a finished run's last checkpoint would
    # otherwise make a rerun "resume" with no steps to run and no curves to log.
    shutil.rmtree(CHECKPOINTS / family_name, ignore_errors=True)
    write_json({"trained": 1, "distilled": int(settings.distill), "source": source,
                "training_examples": len(data.examples),
                **{k: v for k, v in summary.items() if isinstance(v, (int, float)) or k == "kept"},
                # per epoch as a mapping, so dvc shows each (it skips lists)
                "val_ndcg_at_10_per_epoch": {f"epoch_{i + 1}": score
                                             for i, score in enumerate(summary.get("val_ndcg_at_10_epochs") or [])},
                "validation_queries": len(data.val_qrels), "validation_documents": len(data.val_corpus),
                "base_model": identity_summary(identity)}, METRICS_DIR / "train.json")
    if summary.get("kept_base"):
        click.echo(f"train: no epoch beat the base model on validation (nDCG@10 {summary['val_ndcg_at_10_base']:.4f} "
                   f"vs best epoch {max(summary['val_ndcg_at_10_epochs'], default=float('nan')):.4f}): the base model "
                   "is kept as the fine-tuned model (train.selection: trained forces the trained one)")
    click.echo(f"train: {summary}")
