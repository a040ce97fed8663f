"""Tiny fixtures built in the tests: a BEIR-layout dataset and a 2-layer BERT with a WordPiece vocab trained on it."""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "heart": "cardiac artery blood pressure heart muscle infarction",
    "brain": "neuron cortex synapse brain memory cognition",
    "lung": "pulmonary airway asthma lung breathing oxygen",
    "bone": "skeletal fracture osteoporosis bone density calcium",
    "skin": "dermal melanoma rash skin lesion sunlight",
    "liver": "hepatic cirrhosis bile liver enzyme alcohol",
    "kidney": "renal nephron dialysis kidney urine filtration",
    "gut": "intestinal microbiome bowel gut bacteria digestion",
}
FILLER = "study results patients group effect analysis trial data observed increase reduced level".split()


def write_tiny_dataset(folder: Path, *, docs_per_topic: int = 6, seed: int = 0, conversations: bool = False) -> Path:
    """A corpus of topic documents; each query names one document's unique marker word plus topic words.

    Splits: train (most queries) and test, qrels grade 1 (and a grade-2 doc per test query for graded nDCG).
    With ``conversations`` queries carry conversation_id/turn/history like MTRAG.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    corpus, queries, qrels = [], [], {"train": [], "test": []}
    for topic, words in TOPICS.items():
        topic_words = words.split()
        for i in range(docs_per_topic):
            doc_id = f"{topic}{i}"
            marker = f"{topic}marker{i}"
            body = " ".join(rng.choice(topic_words + FILLER) for _ in range(30))
            corpus.append({"_id": doc_id, "title": f"{topic} {marker}", "text": f"{marker} {body}"})
    doc_ids = [d["_id"] for d in corpus]
    for n, doc_id in enumerate(doc_ids):
        topic = doc_id.rstrip("0123456789")
        qid = f"q{n}"
        text = f"{topic} {doc_id.replace(topic, topic + 'marker')} " + " ".join(rng.sample(TOPICS[topic].split(), 2))
        record = {"_id": qid, "text": text}
        if conversations:
            conv = f"conv{n // 3}"
            turn = n % 3 + 1
            record.update({"conversation_id": conv, "turn": turn,
                           "history": [{"speaker": "user", "text": f"tell me about {topic}"},
                                       {"speaker": "agent", "text": f"{topic} is an organ"}] * (turn - 1)})
        queries.append(record)
        split = "test" if n % 4 == 0 else "train"
        qrels[split].append((qid, doc_id, 1))
        if split == "test":
            sibling = doc_ids[n + 1] if n + 1 < len(doc_ids) and doc_ids[n + 1].startswith(topic) else doc_ids[n - 1]
            qrels[split].append((qid, sibling, 2 if n % 8 == 0 else 1))
    with open(folder / "corpus.jsonl", "w") as out:
        out.writelines(json.dumps(d) + "\n" for d in corpus)
    with open(folder / "queries.jsonl", "w") as out:
        out.writelines(json.dumps(q) + "\n" for q in queries)
    (folder / "qrels").mkdir(exist_ok=True)
    for split, rows in qrels.items():
        with open(folder / "qrels" / f"{split}.tsv", "w") as out:
            out.write("query-id\tcorpus-id\tscore\n")
            out.writelines(f"{q}\t{d}\t{g}\n" for q, d, g in rows)
    return folder


def corpus_texts(folder: Path) -> list[str]:
    texts = []
    for name in ("corpus.jsonl", "queries.jsonl"):
        for line in open(folder / name):
            record = json.loads(line)
            texts.append(f"{record.get('title', '')} {record['text']}")
    return texts


def wordpiece_tokenizer(texts: list[str]):
    """A BERT-style WordPiece tokenizer (lower-cased, [CLS] ... [SEP]) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import WordPiece
    from tokenizers.processors import TemplateProcessing
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    return BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")


def write_tiny_bert(out_dir: Path, texts: list[str], *, hidden: int = 32, layers: int = 2) -> Path:
    """A randomly initialised 2-layer BERT with a WordPiece vocab trained on ``texts``, saved as a
    sentence-transformers model (mean pooling, normalised)."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    import torch

    torch.manual_seed(0)
    fast = wordpiece_tokenizer(texts)
    bert_dir = out_dir / "bert"
    fast.save_pretrained(bert_dir)
    config = BertConfig(vocab_size=len(fast), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=128)
    BertModel(config).save_pretrained(bert_dir)
    transformer = models.Transformer(str(bert_dir), max_seq_length=64)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling, models.Normalize()])
    model.save(str(out_dir / "st"))
    return out_dir / "st"


def write_tiny_t5(out_dir: Path, texts: list[str], *, d_model: int = 32) -> Path:
    """A randomly initialised one-layer T5 (a seq2seq query generator's shape) with a WordPiece vocab trained on
    ``texts``: it decodes vocabulary words, which is all a generator test needs of it."""
    from transformers import T5Config, T5ForConditionalGeneration

    import torch

    torch.manual_seed(0)
    fast = wordpiece_tokenizer(texts)
    fast.save_pretrained(out_dir)
    config = T5Config(vocab_size=len(fast), d_model=d_model, d_kv=16, d_ff=d_model * 2, num_layers=1, num_heads=2,
                      pad_token_id=fast.pad_token_id, eos_token_id=fast.sep_token_id,
                      decoder_start_token_id=fast.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(out_dir)
    return out_dir
