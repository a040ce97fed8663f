"""Where the time of ONE fine-tuning step of the default dense training goes on the CPU, and what the candidate
savings are worth.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_step_cost.py [--steps 3] [--threads 1]
        [--dataset /work/shared/datasets/scifact] [--encode-sample 512] [--out benchmarks/results/train_step_cost.json]

The default training (params.yaml ``train:`` / ``models.dense:``; retrieval/models/dense.py ``train``): all-MiniLM-L6-v2
at max_seq_length 256, MultipleNegativesRankingLoss over (query, positive, negative_1), batch size 32, AdamW lr 5e-5
(fused, weight decay 0: the Trainer's defaults), model in train mode (dropout on). Rows are built here: SciFact train
claims (queries.jsonl + qrels/train.tsv), the positive's ``doc_text`` and a seeded random other document as the
negative (a step's cost does not depend on which document it is). Every measurement runs the same batches from the
same starting weights with a new optimizer: batch 0 is the warm-up step, batches 1..--steps are timed, medians kept.

In the order run:
(5) the validation pass, first, as the Trainer scores the base model before its first step: ``model.encode`` at batch
    size 64 in fp32 and in bf16 autocast, timed on a seeded sample of --encode-sample documents and extrapolated
    linearly to the whole corpus;
(1)-(3) the default fp32 step cut into parts: tokenising each column (``model.tokenize``), the forward of each column
    as the loss calls it (``model(features)["sentence_embedding"]``), the loss from the embeddings, its backward,
    gradient clipping (the Trainer's max_grad_norm 1.0; not counted in the step) and the AdamW step. Their sum is the
    default whole step (a plain loop with clocks between its calls; the CPU runs synchronously);
(4) whole steps in a plain loop (tokenize, loss forward, backward, AdamW step): fp32; bf16 autocast around forward +
    loss (weights and optimizer fp32); documents at max_seq_length 192 and 128 (queries stay at 256); no hard negative
    (in-batch negatives only); CachedMultipleNegativesRankingLoss at mini_batch_size 8 and 32.

Memory: a step allocates gigabytes of activations, in tensors above glibc's mmap threshold (32 MiB at most), which
glibc maps, the kernel faults in page by page, and glibc unmaps again, every step; on this VM those page faults are a
large share of the default step (each row records its sys CPU seconds and minor faults). How many a variant pays
also depends on what earlier measurements left in glibc's heap, so (1)-(3) run with glibc untouched in a process that
has only encoded (as in real training), and then ``mallopt`` makes glibc keep freed memory (what the environment
variables MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ do) and every variant of (4), fp32 included, runs under
that one allocator state: their ratios to that fp32 compare compute; ratios to the default step include the allocator.

Not in the plain loop (the Trainer adds them): the learning-rate schedule, data loading, logging, checkpoints.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MAX_SEQ_LENGTH, BATCH_SIZE, LEARNING_RATE, SEED, ENCODE_BATCH = 256, 32, 5e-5, 42, 64
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after 1 warm-up step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS)")
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "datasets" / "scifact"))
    parser.add_argument("--encode-sample", type=int, default=512, help="documents encoded for the validation cost")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step_cost.json"))
    return parser.parse_args()


ARGS = parse_args()
# Before torch is imported, or its thread pools are already sized.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(ARGS.threads)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))

import sentence_transformers  # noqa: E402
import torch  # noqa: E402
from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss  # noqa: E402

from retrieval.allocator import keep_freed_memory  # noqa: E402
from retrieval.dataset import doc_text, load_beir  # noqa: E402
from retrieval.io import write_json  # noqa: E402
from retrieval.models import dense  # noqa: E402


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    flags: set[str] = set()
    name = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
        elif line.startswith("model name") and not name:
            name = line.split(":", 1)[1].strip()
    return {"model_name": name, "flags": {flag: flag in flags for flag in CPU_FLAGS}}


def training_rows(dataset) -> list[tuple[str, str, str]]:
    """(query, positive, negative) for every train judgment, shuffled with SEED; the negative is a random document
    that is not one of the query's positives."""
    rng = random.Random(SEED)
    doc_ids = list(dataset.corpus)
    rows = []
    for qid, judged in dataset.qrels["train"].items():
        for did, grade in judged.items():
            if grade <= 0:
                continue
            negative = rng.choice(doc_ids)
            while negative in judged:
                negative = rng.choice(doc_ids)
            rows.append((dataset.queries[qid]["text"], doc_text(dataset.corpus[did]), doc_text(dataset.corpus[negative])))
    rng.shuffle(rows)
    return rows


def length_stats(tokenizer, texts: list[str]) -> dict:
    """Token counts with [CLS]/[SEP], as the model sees them at max_seq_length 256 and untruncated."""
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
    capped = [min(n, MAX_SEQ_LENGTH) for n in lengths]
    return {"count": len(lengths), "mean_at_256": statistics.fmean(capped), "max_at_256": max(capped),
            "mean_untruncated": statistics.fmean(lengths), "median_untruncated": statistics.median(lengths),
            "max_untruncated": max(lengths),
            **{f"fraction_over_{cap}": sum(n > cap for n in lengths) / len(lengths) for cap in (128, 192, 256)}}


def tokenize(model, texts: list[str], max_len: int) -> dict:
    """``model.tokenize`` at ``max_len`` (the model has one max_seq_length; documents may get a shorter one)."""
    old = model.max_seq_length
    model.max_seq_length = max_len
    try:
        return model.tokenize(texts)
    finally:
        model.max_seq_length = old


def clock(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def with_usage(fn):
    """fn()'s result, plus the process's sys CPU seconds and minor page faults while it ran."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    out = fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return out, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt


def summary(samples: list[tuple[float, float, int]], **extra) -> dict:
    """Medians of (wall seconds, sys CPU seconds, minor faults) samples."""
    return {**extra, "median_s": statistics.median(s for s, _, _ in samples), "samples_s": [s for s, _, _ in samples],
            "median_sys_cpu_s": statistics.median(c for _, c, _ in samples),
            "median_minor_faults": statistics.median(f for _, _, f in samples)}


def fresh(model, initial_state):
    """The starting weights and a new optimizer, so every measurement's warm-up step creates its AdamW state."""
    model.load_state_dict(initial_state)
    model.train()
    model.zero_grad(set_to_none=True)
    # The Trainer's default optimizer on torch >= 2.8 ("adamw_torch_fused"), weight decay 0.
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0, fused=True)


def batch(rows, index: int) -> list[tuple[str, str, str]]:
    return rows[index * BATCH_SIZE:(index + 1) * BATCH_SIZE]


def instrumented_step(model, loss, optimizer, rows) -> dict[str, float]:
    """The default fp32 step cut into its parts: MNRL's own forward is exactly these embeddings, then the loss."""
    names = ("query", "positive", "negative")
    times: dict[str, float] = {}
    features = []
    for name, texts in zip(names, zip(*rows)):
        times[f"tokenize_{name}"], f = clock(lambda: tokenize(model, list(texts), MAX_SEQ_LENGTH))
        features.append(f)
    embeddings = []
    for name, f in zip(names, features):
        times[f"forward_{name}"], e = clock(lambda: model(f)["sentence_embedding"])
        embeddings.append(e)
    labels = torch.zeros(len(rows), dtype=torch.long)  # MNRL ignores labels
    times["loss_from_embeddings"], value = clock(lambda: loss.compute_loss_from_embeddings(embeddings, labels))
    times["backward"], _ = clock(value.backward)
    times["clip_grad_norm"], _ = clock(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    times["optimizer_step"], _ = clock(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    return times


def plain_step(model, loss, optimizer, rows, *, doc_len: int, columns: int, bf16: bool) -> tuple[float, int]:
    """One step as a plain loop; returns its seconds and the padded length of the positives' batch."""
    start = time.perf_counter()
    cols = list(zip(*rows))[:columns]
    features = [tokenize(model, list(cols[0]), MAX_SEQ_LENGTH)]
    features += [tokenize(model, list(texts), doc_len) for texts in cols[1:]]
    padded = int(features[1]["input_ids"].shape[1])
    labels = torch.zeros(len(rows), dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        value = loss(features, labels)
    value.backward()  # outside autocast, as usual: backward ops run in the dtype their forward used
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, padded


def mnrl(model):
    return MultipleNegativesRankingLoss(model)


VARIANTS = {
    # name: (doc max_seq_length, columns, bf16 autocast, loss factory)
    "fp32": (256, 3, False, mnrl),
    "bf16 autocast": (256, 3, True, mnrl),
    "docs max_seq_length 192": (192, 3, False, mnrl),
    "docs max_seq_length 128": (128, 3, False, mnrl),
    "no hard negative (2 columns)": (256, 2, False, mnrl),
    "CachedMNRL mini_batch 8": (256, 3, False, lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=8)),
    "CachedMNRL mini_batch 32": (256, 3, False, lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=32)),
}
DEFAULT = "fp32 (default; glibc as is)"


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    torch.manual_seed(SEED)
    began = time.perf_counter()

    def progress(what: str) -> None:
        print(f"{what} ({time.perf_counter() - began:.0f} s)", flush=True)

    dataset = load_beir(ARGS.dataset)
    rows = training_rows(dataset)
    if len(rows) < (ARGS.steps + 1) * BATCH_SIZE:
        raise SystemExit(f"only {len(rows)} rows: too few for {ARGS.steps} timed steps of {BATCH_SIZE}")
    model = dense.load(MODEL, {"max_seq_length": MAX_SEQ_LENGTH})
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    positives = sorted({did for judged in dataset.qrels["train"].values() for did in judged})
    token_lengths = {
        "train_queries": length_stats(model.tokenizer, [dataset.queries[q]["text"] for q in dataset.qrels["train"]]),
        "train_positives": length_stats(model.tokenizer, [doc_text(dataset.corpus[d]) for d in positives]),
        "corpus": length_stats(model.tokenizer, [doc_text(doc) for doc in dataset.corpus.values()]),
    }
    timed = range(1, ARGS.steps + 1)

    # (5) The validation pass, before any step (the Trainer scores the base model first).
    model.eval()
    sample_ids = random.Random(SEED).sample(list(dataset.corpus), min(ARGS.encode_sample, len(dataset.corpus)))
    texts = [doc_text(dataset.corpus[d]) for d in sample_ids]
    validation = {"sample_docs": len(texts), "corpus_docs": len(dataset.corpus), "batch_size": ENCODE_BATCH,
                  "note": f"timed once on a seeded sample of {len(texts)} documents after a warm-up batch, "
                          f"extrapolated linearly to {len(dataset.corpus)}"}
    for label, bf16 in (("fp32", False), ("bf16 autocast", True)):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            dense.encode(model, texts[:ENCODE_BATCH], batch_size=ENCODE_BATCH, progress=False)  # warm-up
            (seconds, _), sys_s, faults = with_usage(
                lambda: clock(lambda: dense.encode(model, texts, batch_size=ENCODE_BATCH, progress=False)))
        validation[label] = {"sample_s": seconds, "per_doc_s": seconds / len(texts), "sys_cpu_s": sys_s,
                             "minor_faults": faults, "extrapolated_corpus_s": seconds * len(dataset.corpus) / len(texts)}
    validation["bf16 autocast"]["ratio_to_fp32"] = validation["bf16 autocast"]["sample_s"] / validation["fp32"]["sample_s"]
    progress("validation encode")

    # (1)-(3): the default fp32 step by parts, glibc untouched.
    optimizer, loss = fresh(model, initial_state), mnrl(model)
    instrumented_step(model, loss, optimizer, batch(rows, 0))
    runs = [with_usage(lambda: instrumented_step(model, loss, optimizer, batch(rows, i))) for i in timed]
    parts = [p for p, _, _ in runs]
    components = {name: {"median_s": statistics.median(p[name] for p in parts), "samples_s": [p[name] for p in parts]}
                  for name in parts[0]}
    totals = [sum(v for k, v in p.items() if k != "clip_grad_norm") for p in parts]
    for group in ("tokenize", "forward"):
        components[f"{group}_all_columns"] = {"median_s": statistics.median(
            sum(v for k, v in p.items() if k.startswith(group + "_")) for p in parts)}
    components["whole_step_without_clip"] = {"median_s": statistics.median(totals)}
    variants = {DEFAULT: summary([(t, c, f) for t, (_, c, f) in zip(totals, runs)], allocator="glibc default",
                                 doc_max_seq_length=MAX_SEQ_LENGTH, columns=3, bf16_autocast=False,
                                 loss="MultipleNegativesRankingLoss", mean_padded_positive_length=None,
                                 measured_as="sum of the timed parts (components_fp32)")}
    progress(f"{DEFAULT}: {variants[DEFAULT]['median_s']:.3f} s")

    # (4): whole steps, all under one allocator state (cannot be undone, hence after the default step).
    allocator = "mallopt: freed memory kept" if keep_freed_memory() else "glibc default (mallopt unavailable)"
    for name, (doc_len, columns, bf16, make_loss) in VARIANTS.items():
        optimizer, loss = fresh(model, initial_state), make_loss(model)

        def step(i):
            return plain_step(model, loss, optimizer, batch(rows, i), doc_len=doc_len, columns=columns, bf16=bf16)

        step(0)
        runs = [with_usage(lambda: step(i)) for i in timed]
        variants[name] = summary([(s, c, f) for (s, _), c, f in runs], allocator=allocator, doc_max_seq_length=doc_len,
                                 columns=columns, bf16_autocast=bf16, loss=type(loss).__name__,
                                 mean_padded_positive_length=statistics.fmean(p for (_, p), _, _ in runs))
        progress(f"{name}: {variants[name]['median_s']:.3f} s")
    for v in variants.values():
        v["ratio_to_default"] = v["median_s"] / variants[DEFAULT]["median_s"]
        v["ratio_to_fp32_same_allocator"] = v["median_s"] / variants["fp32"]["median_s"] if v is not variants[DEFAULT] \
            else None

    result = {
        "command": f"HF_HUB_OFFLINE=1 OMP_NUM_THREADS={ARGS.threads} .venv/bin/python benchmarks/train_step_cost.py "
                   f"--steps {ARGS.steps} --threads {ARGS.threads}",
        "setup": {"model": MODEL, "max_seq_length": MAX_SEQ_LENGTH, "batch_size": BATCH_SIZE,
                  "learning_rate": LEARNING_RATE, "optimizer": "torch.optim.AdamW(fused=True, weight_decay=0)",
                  "model_mode": "train (dropout on)", "train_rows": len(rows), "timed_steps": ARGS.steps,
                  "warmup_steps": 1, "statistic": "median", "threads": torch.get_num_threads(),
                  "attention": model[0].auto_model.config._attn_implementation, "torch": torch.__version__,
                  "sentence_transformers": sentence_transformers.__version__, "python": platform.python_version(),
                  "cpu": cpu_info(), "variants_allocator": allocator},
        "token_lengths": token_lengths,
        "components_fp32": components,
        "full_step": variants,
        "validation_encode": validation,
        "total_runtime_s": time.perf_counter() - began,
    }
    Path(ARGS.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(result, ARGS.out)
    report(result)


def report(result: dict) -> None:
    setup = result["setup"]
    flags = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in setup["cpu"]["flags"].items())
    print(f"\n{setup['cpu']['model_name']} | {flags}\ntorch {setup['torch']}, sentence-transformers "
          f"{setup['sentence_transformers']}, {setup['threads']} thread(s), median of {setup['timed_steps']} steps")
    print("\nToken lengths (with [CLS]/[SEP]):")
    print(f"  {'':18}{'mean@256':>9}{'max@256':>8}{'mean':>8}{'max':>6}{'>128':>7}{'>192':>7}{'>256':>7}")
    for name, s in result["token_lengths"].items():
        print(f"  {name:18}{s['mean_at_256']:9.1f}{s['max_at_256']:8d}{s['mean_untruncated']:8.1f}"
              f"{s['max_untruncated']:6d}{s['fraction_over_128']:7.1%}{s['fraction_over_192']:7.1%}"
              f"{s['fraction_over_256']:7.1%}")
    print("\nDefault fp32 step by part, glibc as is (s):")
    for name, c in result["components_fp32"].items():
        print(f"  {name:28}{c['median_s']:9.3f}")
    print(f"\nWhole step (plain loop); rows below the first: {setup['variants_allocator']}")
    print(f"  {'variant':32}{'s/step':>9}{'/default':>9}{'/fp32 same alloc':>17}{'doc pad':>8}{'sys s':>7}"
          f"{'minflt':>9}")
    for name, v in result["full_step"].items():
        same = "" if v["ratio_to_fp32_same_allocator"] is None else f"{v['ratio_to_fp32_same_allocator']:.3f}"
        pad = "" if v["mean_padded_positive_length"] is None else f"{v['mean_padded_positive_length']:.1f}"
        print(f"  {name:32}{v['median_s']:9.3f}{v['ratio_to_default']:9.3f}{same:>17}{pad:>8}"
              f"{v['median_sys_cpu_s']:7.2f}{v['median_minor_faults']:9.0f}")
    val = result["validation_encode"]
    print(f"\nValidation encode, batch {val['batch_size']} ({val['note']}):")
    for label in ("fp32", "bf16 autocast"):
        print(f"  {label:14}{val[label]['sample_s']:8.2f} s / {val['sample_docs']} docs -> "
              f"{val[label]['extrapolated_corpus_s']:8.1f} s / {val['corpus_docs']} docs")
    print(f"  bf16/fp32 ratio {val['bf16 autocast']['ratio_to_fp32']:.3f}")
    print(f"\ntotal runtime {result['total_runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
