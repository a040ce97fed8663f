"""Cross-encoder reranking and fine-tuning, on a tiny BERT built here (no model hub needed)."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import TrainerCallback

from retrieval.metrics import ranked
from retrieval.models.cross_encoder import (_bce_dataset, _listwise_dataset, load_cross_encoder, rerank,
                                            train_cross_encoder)

# (query, relevant document) pairs on distinct topics.
PAIRS = [
    ("volcano lava eruption", "Volcanoes erupt hot lava and ash when magma pressure builds up."),
    ("honey bees pollinate", "Honey bees pollinate flowers and make honey in their hives."),
    ("glacier ice melting", "Glaciers are slow rivers of ice; warming makes the ice melt."),
    ("chess opening moves", "Chess players study opening moves such as the Sicilian defence."),
    ("coffee caffeine sleep", "Caffeine in coffee blocks adenosine and can delay sleep."),
    ("whale song ocean", "Humpback whales sing long songs that travel across the ocean."),
    ("bread yeast dough", "Yeast ferments sugar in dough so bread rises before baking."),
    ("solar panel electricity", "Solar panels turn sunlight into electricity with silicon cells."),
    ("vaccine immune antibodies", "Vaccines train the immune system to produce antibodies."),
    ("guitar strings tuning", "Guitar strings are tuned by turning the pegs on the headstock."),
    ("desert cactus water", "Cactus plants store water to survive in the dry desert."),
    ("bridge steel cables", "Suspension bridges hang the deck from strong steel cables."),
]
QUERIES = {f"q{i:02d}": query for i, (query, _) in enumerate(PAIRS)}
DOC_TEXTS = {f"d{i:02d}": doc for i, (_, doc) in enumerate(PAIRS)}
DOCS = list(DOC_TEXTS.values())
# Each query's own document is its positive; four other topics' documents are its (easy) negatives.
TRAIN_ROWS = [{"query": query, "positives": [DOCS[i]], "negatives": [DOCS[(i + j) % len(DOCS)] for j in range(1, 5)]}
              for i, query in enumerate(QUERIES.values())]


pytestmark = pytest.mark.single_torch_thread


@pytest.fixture(scope="module")
def tiny_cross_encoder_dir(tmp_path_factory):
    """A 2-layer, hidden-32 BertForSequenceClassification (one score) with a WordPiece vocabulary of the fixture.

    The vocabulary is every word of the fixture, and every character (alone and as a ``##`` continuation), in
    sorted order: the tokenizers library's WordPiece trainer breaks ties in hash-map order, which changes from one
    process to the next, and with it the token ids and so every score of the model."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({word for text in DOCS + list(QUERIES.values())
                    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))})
    chars = sorted({char for word in words for char in word})
    # Four-letter stems too, so that related forms share a token (volcano / volcanoes, erupt / eruption).
    stems = sorted({word[:4] for word in words if len(word) > 4} - set(words))
    tokens = specials + chars + [f"##{char}" for char in chars] + stems + [word for word in words if word not in chars]
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(tokens)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    bert_tokenizer = BertTokenizerFast(tokenizer_object=tokenizer, model_max_length=64, unk_token="[UNK]",
                                       pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")

    torch.manual_seed(0)
    # initializer_range 0.2 rather than BERT's 0.02: untrained scores then differ by ~0.1 rather than ~1e-5, so the
    # order the model gives is clear-cut, and the model also learns the fixture faster. No dropout, for the same reason.
    config = BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=1,
                        initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    folder = tmp_path_factory.mktemp("tiny-cross-encoder")
    BertForSequenceClassification(config).save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    return folder


def logits(model, pairs):
    return model.predict(pairs, activation_fn=torch.nn.Identity(), show_progress_bar=False, batch_size=1)


def test_rerank_follows_the_model_and_cuts_at_top_k(tiny_cross_encoder_dir):
    model = load_cross_encoder(tiny_cross_encoder_dir, max_length=64)
    # q00's d02 and d03 tie at 3.0 across the cut: trec order puts d03 first, so top_k=3 keeps d00, d01, d03.
    run = {"q00": {"d00": 5.0, "d01": 4.0, "d02": 3.0, "d03": 3.0, "d04": 0.5},
           "q01": {f"d{i:02d}": float(i) for i in range(8)},
           "q02": {}}
    reranked = rerank(model, QUERIES, run, DOC_TEXTS, top_k=3, batch_size=4, show_progress=False)

    assert sorted(reranked) == ["q00", "q01", "q02"] and reranked["q02"] == {}
    assert sorted(reranked["q00"]) == ["d00", "d01", "d03"]
    assert sorted(reranked["q01"]) == ["d05", "d06", "d07"]  # the three highest BM25 scores
    for qid, docs in reranked.items():
        expected = dict(zip(docs, logits(model, [(QUERIES[qid], DOC_TEXTS[d]) for d in docs])))  # one pair at a time
        assert docs == pytest.approx(expected, abs=1e-5)  # raw logits, independent of batching and padding
        order = sorted(expected, key=expected.get, reverse=True)
        assert all(expected[a] - expected[b] > 1e-4 for a, b in zip(order, order[1:])), "fixture scores too close"
        assert ranked(docs) == order
    # Over all 12 documents the model's order is not the first-stage one (by chance 1 in 12!).
    first_stage = {"q03": {doc: float(i) for i, doc in enumerate(DOC_TEXTS)}}
    all_reranked = rerank(model, QUERIES, first_stage, DOC_TEXTS, show_progress=False)
    assert ranked(all_reranked["q03"]) != ranked(first_stage["q03"])


def test_rerank_needs_every_text(tiny_cross_encoder_dir):
    model = load_cross_encoder(tiny_cross_encoder_dir, max_length=64)
    with pytest.raises(KeyError, match="documents have no text"):
        rerank(model, QUERIES, {"q00": {"d00": 1.0, "nope": 2.0}}, DOC_TEXTS, show_progress=False)
    with pytest.raises(KeyError, match="queries have no text"):
        rerank(model, QUERIES, {"nope": {"d00": 1.0}}, DOC_TEXTS, show_progress=False)


def test_training_examples_share_out_the_hardest_negatives():
    row = {"query": "q", "positives": ["p1", "p2"], "negatives": ["n1", "p2", "n2", "n1", "n3"]}
    # Negatives deduplicated and without positives: n1, n2, n3. Positive i takes the next ones, wrapping round.
    assert _bce_dataset([row], negatives_per_positive=2) == {
        "query": ["q"] * 6, "document": ["p1", "n1", "n2", "p2", "n3", "n1"], "label": [1.0, 0.0, 0.0] * 2}
    assert _listwise_dataset([row, {"query": "r", "positives": ["p"], "negatives": []}], group_size=3) == {
        "query": ["q", "q"], "positive": ["p1", "p2"], "negative_1": ["n1", "n3"], "negative_2": ["n2", "n1"]}


@pytest.mark.parametrize("loss", ["bce", "listwise"])
def test_training_changes_saves_and_reloads(tiny_cross_encoder_dir, tmp_path, loss):
    model = load_cross_encoder(tiny_cross_encoder_dir, max_length=64)
    probe = [(row["query"], doc) for row in TRAIN_ROWS[:3] for doc in row["positives"] + row["negatives"][:2]]
    before = logits(model, probe)

    out_dir = tmp_path / "reranker"
    summary = train_cross_encoder(model, TRAIN_ROWS, out_dir, loss=loss, negatives_per_positive=2, group_size=3,
                                  epochs=1, batch_size=4, lr=1e-3)

    # bce: 12 rows x (1 positive + 2 negatives) pairs; listwise: 12 groups (positive + 2 negatives). Batches of 4.
    assert summary["train_examples"] == (36 if loss == "bce" else 12)
    assert summary["steps"] == summary["train_examples"] // 4 and math.isfinite(summary["train_loss"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reranker"]  # saved atomically: no temporary left over
    reloaded = load_cross_encoder(out_dir, max_length=64)
    after = logits(reloaded, probe)
    np.testing.assert_allclose(after, logits(model, probe), atol=1e-5)  # what was saved is what was trained
    assert np.abs(after - before).max() > 1e-3

    # Seeded: the same training from the same start gives the same model.
    again = load_cross_encoder(tiny_cross_encoder_dir, max_length=64)
    train_cross_encoder(again, TRAIN_ROWS, tmp_path / "again", loss=loss, negatives_per_positive=2, group_size=3,
                        epochs=1, batch_size=4, lr=1e-3)
    np.testing.assert_allclose(logits(again, probe), after, atol=1e-6)


@pytest.mark.parametrize("loss", ["bce", "listwise"])
def test_training_puts_positives_first_on_an_easy_fixture(tiny_cross_encoder_dir, tmp_path, loss):
    model = load_cross_encoder(tiny_cross_encoder_dir, max_length=64)
    # bce at 3e-3 sometimes settles on scoring every pair alike (the prior); 1e-3 does not on this fixture.
    summary = train_cross_encoder(model, TRAIN_ROWS, tmp_path / "reranker", loss=loss, negatives_per_positive=4,
                                  group_size=5, epochs=30, batch_size=4, lr=1e-3 if loss == "bce" else 3e-3)
    # Well below the loss of a model that scores every pair alike: with 1 positive to 4 negatives, binary
    # cross-entropy H(0.2) = 0.50 for bce, and ln(5) = 1.61 for a softmax over groups of 5.
    assert summary["train_loss"] < (0.4 if loss == "bce" else 1.0)
    # Rerank each query's positive and negatives: the positive (d<i> for q<i>) must come first.
    doc_id = {text: doc for doc, text in DOC_TEXTS.items()}
    run = {qid: {doc_id[text]: 0.0 for text in row["positives"] + row["negatives"]}
           for qid, row in zip(QUERIES, TRAIN_ROWS)}
    reranked = rerank(load_cross_encoder(tmp_path / "reranker", max_length=64), QUERIES, run, DOC_TEXTS,
                      show_progress=False)
    assert {qid: ranked(docs)[0] for qid, docs in reranked.items()} == {qid: "d" + qid[1:] for qid in QUERIES}


def val_ndcg(model_dir, val_rows) -> float:
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    samples = [{"query": r["query"], "positive": r["positives"], "negative": r["negatives"]} for r in val_rows]
    evaluator = CrossEncoderRerankingEvaluator(samples, at_k=10, write_csv=False)
    return evaluator(load_cross_encoder(model_dir, max_length=64))["ndcg@10"]


def test_validation_keeps_the_best_of_base_and_epochs(tiny_cross_encoder_dir, tmp_path):
    model = load_cross_encoder(tiny_cross_encoder_dir, max_length=64)
    train_rows, val_rows = TRAIN_ROWS[:8], TRAIN_ROWS[8:]
    summary = train_cross_encoder(model, train_rows, tmp_path / "reranker", loss="listwise", group_size=3,
                                  epochs=3, batch_size=4, lr=1e-3, val_rows=val_rows)
    epochs, base = summary["val_ndcg_at_10_epochs"], summary["val_ndcg_at_10_base"]
    assert len(epochs) == 3 and summary["val_ndcg_at_10_best"] == max([base, *epochs])
    assert base == pytest.approx(val_ndcg(tiny_cross_encoder_dir, val_rows), abs=1e-9)  # scored before training
    kept = "base" if base >= max(epochs) else f"epoch {epochs.index(max(epochs)) + 1}"
    assert (summary["kept"], summary["kept_base"]) == (kept, int(kept == "base"))
    # The saved model is the kept one: re-evaluating it gives the best score.
    assert val_ndcg(tmp_path / "reranker", val_rows) == pytest.approx(summary["val_ndcg_at_10_best"], abs=1e-6)


class Interrupted(Exception):
    pass


class InterruptAtStep(TrainerCallback):
    """Stops training by raising once ``step`` steps are done (before that step's checkpoint could be saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted(f"stopped at step {state.global_step}")


class StepsRun(TrainerCallback):
    """The global steps this run trains."""

    def __init__(self) -> None:
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_an_interrupted_run_resumes_from_its_step_checkpoint(tiny_cross_encoder_dir, tmp_path):
    # 9 groups in batches of 3: 3 steps an epoch, 9 in 3 epochs; a checkpoint every 2 steps.
    train_rows, val_rows = TRAIN_ROWS[:9], TRAIN_ROWS[9:]
    settings = dict(loss="listwise", group_size=3, epochs=3, batch_size=3, lr=1e-3, val_rows=val_rows,
                    checkpoint_steps=2)
    probe = [(row["query"], doc) for row in TRAIN_ROWS for doc in row["positives"] + row["negatives"][:2]]
    whole = train_cross_encoder(load_cross_encoder(tiny_cross_encoder_dir, max_length=64), train_rows,
                                tmp_path / "whole", checkpoint_dir=tmp_path / "whole-checkpoints", **settings)
    assert (whole["steps"], whole["resumed"]) == (9, 0)

    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(Interrupted):
        train_cross_encoder(load_cross_encoder(tiny_cross_encoder_dir, max_length=64), train_rows,
                            tmp_path / "reranker", checkpoint_dir=checkpoints, callbacks=[InterruptAtStep(5)],
                            **settings)
    assert not (tmp_path / "reranker").exists()
    # Step 5 raised before its own save: the latest checkpoint is step 4's (in epoch 2), the only one kept; epoch 1
    # (steps 1-3) was evaluated, and the base before it.
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4"]
    assert [e["label"] for e in json.loads((checkpoints / "best.json").read_text())["history"]] == ["base", "epoch 1"]

    steps_run = StepsRun()
    resumed = train_cross_encoder(load_cross_encoder(tiny_cross_encoder_dir, max_length=64), train_rows,
                                  tmp_path / "reranker", checkpoint_dir=checkpoints, callbacks=[steps_run], **settings)
    assert (resumed["steps"], resumed["resumed"]) == (whole["steps"], 1)
    assert steps_run.steps == [5, 6, 7, 8, 9]  # on from step 4's checkpoint, not from the start
    # The base was not scored again; training went on where it stopped (optimizer state and data order restored),
    # and so scored and kept what the uninterrupted run did.
    assert [e["label"] for e in json.loads((checkpoints / "best.json").read_text())["history"]] == \
        ["base", "epoch 1", "epoch 2", "epoch 3"]
    assert resumed["val_ndcg_at_10_base"] == whole["val_ndcg_at_10_base"]
    assert resumed["val_ndcg_at_10_epochs"] == pytest.approx(whole["val_ndcg_at_10_epochs"], abs=1e-9)
    assert resumed["kept"] == whole["kept"]
    np.testing.assert_allclose(logits(load_cross_encoder(tmp_path / "reranker", max_length=64), probe),
                               logits(load_cross_encoder(tmp_path / "whole", max_length=64), probe), atol=1e-5)


def test_new_negatives_with_the_same_row_count_do_not_resume(tiny_cross_encoder_dir, tmp_path):
    settings = dict(loss="listwise", group_size=3, epochs=1, batch_size=3, lr=1e-3, checkpoint_steps=2)
    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(Interrupted):
        train_cross_encoder(load_cross_encoder(tiny_cross_encoder_dir, max_length=64), TRAIN_ROWS, tmp_path / "a",
                            checkpoint_dir=checkpoints, callbacks=[InterruptAtStep(3)], **settings)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    # The same 12 queries, each with other negatives: as many examples, different ones.
    other_negatives = [{**row, "negatives": row["negatives"][::-1]} for row in TRAIN_ROWS]
    summary = train_cross_encoder(load_cross_encoder(tiny_cross_encoder_dir, max_length=64), other_negatives,
                                  tmp_path / "b", checkpoint_dir=checkpoints, **settings)
    assert (summary["train_examples"], summary["steps"], summary["resumed"]) == (12, 4, 0)


@pytest.fixture(scope="module")
def fitted_cross_encoder_dir(tiny_cross_encoder_dir, tmp_path_factory):
    """The tiny model trained until it ranks every query's own document first among TRAIN_ROWS' candidates."""
    folder = tmp_path_factory.mktemp("fitted") / "reranker"
    train_cross_encoder(load_cross_encoder(tiny_cross_encoder_dir, max_length=64), TRAIN_ROWS, folder,
                        loss="listwise", group_size=5, epochs=30, batch_size=4, lr=3e-3)
    return folder


def test_the_base_model_is_kept_when_training_hurts_on_validation(fitted_cross_encoder_dir, tmp_path):
    base = load_cross_encoder(fitted_cross_encoder_dir, max_length=64)
    probe = [(row["query"], doc) for row in TRAIN_ROWS for doc in row["positives"] + row["negatives"]]
    base_logits = logits(base, probe).reshape(len(TRAIN_ROWS), 5)  # per query: positive, then its 4 negatives
    # Every positive scores above its negatives, so the base model's validation nDCG@10 is DCG / ideal DCG = 1.
    assert (base_logits[:, 0] > base_logits[:, 1:].max(axis=1)).all(), "fixture: the fitted model is not perfect"
    # Training on inverted labels (a negative as the positive, the query's own document as the negative) teaches
    # the model to rank its own document lower: validation on the true labels must see it, and keep the base.
    inverted = [{"query": row["query"], "positives": row["negatives"][:1], "negatives": row["positives"]}
                for row in TRAIN_ROWS]
    settings = dict(loss="listwise", group_size=2, epochs=2, batch_size=4, lr=3e-3, val_rows=TRAIN_ROWS)

    summary = train_cross_encoder(base, inverted, tmp_path / "reranker", checkpoint_dir=tmp_path / "ckpt", **settings)
    assert summary["val_ndcg_at_10_base"] == pytest.approx(1.0)
    assert len(summary["val_ndcg_at_10_epochs"]) == 2 and max(summary["val_ndcg_at_10_epochs"]) < 0.99
    assert (summary["kept"], summary["kept_base"], summary["val_ndcg_at_10_best"]) == \
        ("base", 1, summary["val_ndcg_at_10_base"])
    # What was saved is the base model, not the trained one.
    kept = logits(load_cross_encoder(tmp_path / "reranker", max_length=64), probe).reshape(len(TRAIN_ROWS), 5)
    np.testing.assert_allclose(kept, base_logits, atol=1e-6)
    assert np.abs(logits(base, probe).reshape(len(TRAIN_ROWS), 5) - base_logits).max() > 1e-2  # it did train

    # selection "trained": the best epoch is saved even though the base scores higher.
    trained = train_cross_encoder(load_cross_encoder(fitted_cross_encoder_dir, max_length=64), inverted,
                                  tmp_path / "trained", checkpoint_dir=tmp_path / "ckpt-trained",
                                  selection="trained", **settings)
    epochs = trained["val_ndcg_at_10_epochs"]
    assert trained["val_ndcg_at_10_base"] == pytest.approx(1.0) and epochs == summary["val_ndcg_at_10_epochs"]
    assert (trained["kept"], trained["kept_base"]) == (f"epoch {epochs.index(max(epochs)) + 1}", 0)
    assert val_ndcg(tmp_path / "trained", TRAIN_ROWS) == pytest.approx(max(epochs), abs=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"selection": "best"}, "selection: expected one of validation, trained, got 'best'"),
    ({"checkpoint_steps": 0}, "checkpoint_steps must be >= 1"),
    ({"val_rows": [{"query": "q", "positives": [], "negatives": ["n"]}]}, "none of the 1 rows has a positive"),
    ({"loss": "listwise", "group_size": 1}, "group_size must be >= 2"),
    ({"loss": "bce", "negatives_per_positive": 0}, "negatives_per_positive must be >= 1"),
])
def test_training_argument_errors(tiny_cross_encoder_dir, tmp_path, kwargs, message):
    model = load_cross_encoder(tiny_cross_encoder_dir, max_length=64)
    with pytest.raises(ValueError, match=message):
        train_cross_encoder(model, TRAIN_ROWS, tmp_path / "reranker", **kwargs)
    assert not (tmp_path / "reranker").exists()
