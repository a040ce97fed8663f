"""Encoding speed of each CPU backend side by side, in one run, on the same documents; with each one's embedding
error against plain fp32 sentence-transformers and SciFact nDCG@10.

    python benchmarks/encode_speed.py --threads 1 [--docs 160] [--dataset ../shared/datasets/scifact]
        [--batch-sizes 16 32 64] [--ndcg torch-fp32 fastest] [--out benchmarks/results/encode_speed.json]

Systems: torch-fp32 (plain ``SentenceTransformer(...).encode``: the reference), torch-bf16 (autocast, only where
the CPU has native bf16: emulated bf16 is many times slower), onnx-fp32, onnx-int8, openvino-fp32, openvino-int8
and openvino-bf16 (native bf16 only), the exported ones through ``retrieval.backends.load_sentence_transformer``.

Sorting: ``SentenceTransformer.encode`` already sorts its inputs by length (characters, longest first) before
batching (sentence_transformers/sentence_transformer/model.py, ``length_sorted_idx``), so one ``encode`` call over
all documents is the "sorted" figure; "unsorted" encodes each batch of the documents as they come in the file,
with one ``encode`` call per batch, i.e. what a caller batching by hand without sorting would get.

Timing: every (system, batch size) is timed ``--repeats`` times, round-robin over all systems, after a warm-up
call, and the best time is kept: the machine may be shared, and the fastest pass is the one least disturbed.
Use ``--threads 1`` on a shared 2-core machine so that every system gets the same single core.

nDCG@10: SciFact test (300 claims against the whole corpus), exact inner product over normalised embeddings,
``retrieval.metrics``; only for the systems named by ``--ndcg`` (``fastest`` = the fastest non-reference system
at its best batch size), since encoding the full corpus once per system takes minutes each.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.backends import backend_record, cpu_flags, load_sentence_transformer  # noqa: E402
from retrieval.dataset import doc_text, load_beir  # noqa: E402
from retrieval.io import write_json  # noqa: E402

REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
NATIVE_BF16 = {"avx512_bf16", "amx_bf16"}
# (name, backend, quantize, torch autocast bf16, OpenVINO precision hint, needs native bf16)
SYSTEMS = [
    ("torch-fp32", "torch", "none", False, None, False),
    ("torch-bf16", "torch", "none", True, None, True),
    ("onnx-fp32", "onnx", "none", False, None, False),
    ("onnx-int8", "onnx", "int8", False, None, False),
    ("openvino-fp32", "openvino", "none", False, None, False),
    ("openvino-int8", "openvino", "int8", False, None, False),
    ("openvino-bf16", "openvino", "none", False, "bf16", True),
]
REFERENCE = "torch-fp32"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/datasets/scifact")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--docs", type=int, default=160, help="the first N corpus documents are timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--unsorted-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--systems", nargs="+", default=[s[0] for s in SYSTEMS])
    parser.add_argument("--ndcg", nargs="*", default=[REFERENCE, "fastest"],
                        help="systems to score on the full test set; 'fastest' is resolved after timing")
    parser.add_argument("--cache-dir", default=None, help="export cache (default $RETRIEVAL_CACHE/exports)")
    parser.add_argument("--out", default="benchmarks/results/encode_speed.json")
    args = parser.parse_args(argv)
    known = {s[0] for s in SYSTEMS}
    for name in args.systems + [n for n in args.ndcg if n != "fastest"]:
        if name not in known:
            parser.error(f"unknown system {name!r}: use one of {', '.join(sorted(known))}")
    if args.docs < 1 or args.threads < 1 or args.repeats < 1 or min(args.batch_sizes) < 1:
        parser.error("--docs, --threads, --repeats and --batch-sizes must be positive")
    return args


class System:
    """One encoder as benchmarked: a loaded model plus the precision context it encodes in."""

    def __init__(self, name, backend, quantize, autocast_bf16, ov_precision, model, load_seconds):
        self.name, self.backend, self.quantize = name, backend, quantize
        self.autocast_bf16, self.ov_precision = autocast_bf16, ov_precision
        self.model, self.load_seconds = model, load_seconds

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        from retrieval.precision import inference_precision

        with inference_precision("bf16" if self.autocast_bf16 else "fp32"):
            return self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def encode_unsorted(self, texts: list[str], batch_size: int) -> np.ndarray:
        return np.concatenate([self.encode(texts[i:i + batch_size], batch_size)
                               for i in range(0, len(texts), batch_size)])


def load_system(spec, model_path: str, args) -> System:
    name, backend, quantize, autocast_bf16, ov_precision, _ = spec
    extra = {"model_kwargs": {"ov_config": {"INFERENCE_PRECISION_HINT": ov_precision}}} if ov_precision else {}
    start = time.perf_counter()
    model = load_sentence_transformer(model_path, backend=backend, quantize=quantize, threads=args.threads,
                                      cache_dir=Path(args.cache_dir) if args.cache_dir else None, **extra)
    model.max_seq_length = args.max_seq_length
    return System(name, backend, quantize, autocast_bf16, ov_precision, model, time.perf_counter() - start)


def timed(function) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def ndcg_at_10(system: System, dataset, batch_size: int) -> dict:
    from retrieval.metrics import evaluate

    qrels = dataset.qrels["test"]
    doc_ids = list(dataset.corpus)
    query_ids = sorted(qrels)
    start = time.perf_counter()
    docs = system.encode([doc_text(dataset.corpus[d]) for d in doc_ids], batch_size)
    queries = system.encode([dataset.queries[q]["text"] for q in query_ids], batch_size)
    seconds = time.perf_counter() - start
    scores = queries @ docs.T  # exact inner product = cosine (normalised)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :100]
    run = {q: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, q in enumerate(query_ids)}
    return {"ndcg_at_10": evaluate(qrels, run, ["ndcg_at_10"])["ndcg_at_10"], "encode_seconds": round(seconds, 1),
            "docs": len(doc_ids), "queries": len(query_ids)}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from retrieval.hub import resolve_model

    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    native_bf16 = bool(flags & NATIVE_BF16)
    dataset = load_beir(args.dataset)
    texts = [doc_text(doc) for doc in list(dataset.corpus.values())[:args.docs]]
    model_path = resolve_model(args.model)

    specs = [s for s in SYSTEMS if s[0] in args.systems]
    skipped = {s[0]: "no native bf16 on this CPU (emulated bf16 is many times slower than fp32)"
               for s in specs if s[5] and not native_bf16}
    systems = {}
    for spec in specs:
        if spec[0] in skipped:
            continue
        try:
            systems[spec[0]] = load_system(spec, model_path, args)
        except Exception as error:  # a backend that does not install or export here is reported, not fatal
            skipped[spec[0]] = f"{type(error).__name__}: {error}"
        print(f"loaded {spec[0]}" + (f" ({systems[spec[0]].load_seconds:.1f} s incl. export when not cached)"
                                     if spec[0] in systems else f": skipped, {skipped[spec[0]]}"), flush=True)
    if REFERENCE not in systems:
        raise SystemExit(f"the reference {REFERENCE} must be among --systems")

    for system in systems.values():  # warm-up: first-call allocations, OpenVINO/ORT kernel selection
        system.encode(texts[:8], 8)
    timings: dict[str, dict[str, list[float]]] = {name: {} for name in systems}
    embeddings: dict[str, np.ndarray] = {}
    cells = [(str(b), b, False) for b in args.batch_sizes] + [(f"unsorted{args.unsorted_batch_size}",
                                                                args.unsorted_batch_size, True)]
    for repeat in range(args.repeats):
        for name, system in systems.items():
            for label, batch_size, unsorted in cells:
                encode = system.encode_unsorted if unsorted else system.encode
                seconds, vectors = timed(lambda: encode(texts, batch_size))
                timings[name].setdefault(label, []).append(seconds)
                if label == str(args.batch_sizes[0]) and repeat == 0:
                    embeddings[name] = vectors
            print(f"repeat {repeat + 1}/{args.repeats} {name}: " + ", ".join(
                f"{label} {len(texts) / timings[name][label][-1]:.1f}" for label, _, _ in cells) + " docs/s",
                flush=True)

    reference = embeddings[REFERENCE]
    results = {}
    for name, system in systems.items():
        docs_per_second = {label: len(texts) / min(times) for label, times in timings[name].items()}
        cosine = (embeddings[name] * reference).sum(axis=1)
        results[name] = {
            "backend": system.backend, "quantize": system.quantize,
            "precision": "bf16" if system.autocast_bf16 or system.ov_precision == "bf16" else
            ("int8" if system.quantize == "int8" else "fp32"),
            "record": {k: v for k, v in backend_record(system.model).items() if k != "export_dir"},
            "load_seconds": round(system.load_seconds, 2),
            "docs_per_second": {k: round(v, 2) for k, v in docs_per_second.items()},
            "seconds_all_repeats": {k: [round(t, 3) for t in v] for k, v in timings[name].items()},
            "min_cosine_to_fp32": float(cosine.min()), "mean_cosine_to_fp32": float(cosine.mean()),
        }
    plain = results[REFERENCE]["docs_per_second"]
    for name, result in results.items():
        result["ratio_to_fp32_same_batch"] = {k: round(v / plain[k], 2) for k, v in result["docs_per_second"].items()}
        best_label = max((str(b) for b in args.batch_sizes), key=lambda k: result["docs_per_second"][k])
        result["best_batch_size"] = int(best_label)
        result["best_ratio_to_plain_fp32_batch64"] = round(
            result["docs_per_second"][best_label] / plain.get("64", plain[best_label]), 2)
    fastest = max((n for n in results if n != REFERENCE),
                  key=lambda n: results[n]["docs_per_second"][str(results[n]["best_batch_size"])], default=None)

    to_score = list(dict.fromkeys(fastest if n == "fastest" else n for n in args.ndcg))
    for name in to_score:
        if name in systems:
            print(f"nDCG@10 for {name} (full corpus)...", flush=True)
            results[name]["scifact_test"] = ndcg_at_10(systems[name], dataset, results[name]["best_batch_size"])
            print(f"  {results[name]['scifact_test']}", flush=True)

    report = {
        "machine": {"cpu": _cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "flags": {flag: flag in flags for flag in REPORTED_FLAGS}},
        "settings": {"model": args.model, "dataset": args.dataset, "docs": len(texts), "threads": args.threads,
                     "max_seq_length": args.max_seq_length, "batch_sizes": args.batch_sizes,
                     "unsorted_batch_size": args.unsorted_batch_size, "repeats": args.repeats,
                     "timing": "best of repeats, round-robin over systems"},
        "reference": REFERENCE, "fastest": fastest, "skipped": skipped, "systems": results,
    }
    write_json(report, args.out)
    print(format_table(report))
    print(f"wrote {args.out}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(report: dict) -> str:
    settings = report["settings"]
    labels = [str(b) for b in settings["batch_sizes"]] + [f"unsorted{settings['unsorted_batch_size']}"]
    flags = " ".join(f"{flag}={'yes' if on else 'no'}" for flag, on in report["machine"]["flags"].items())
    lines = [f"{report['machine']['cpu']}, {settings['threads']} thread(s); {flags}",
             f"{settings['docs']} SciFact docs, max_seq_length {settings['max_seq_length']}; docs/s (x plain fp32 "
             "at the same batch size); best of {0} passes".format(settings["repeats"]), ""]
    header = ["system"] + [f"b{label}" if label.isdigit() else label for label in labels] + \
        ["max 1-cos", "nDCG@10"]
    rows = []
    for name, result in report["systems"].items():
        speed = [f"{result['docs_per_second'][l]:.1f} ({result['ratio_to_fp32_same_batch'][l]:.2f}x)" for l in labels]
        ndcg = result.get("scifact_test", {}).get("ndcg_at_10")
        rows.append([name] + speed + [f"{1 - result['min_cosine_to_fp32']:.1e}", f"{ndcg:.4f}" if ndcg is not None else "-"])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    for name, reason in report["skipped"].items():
        lines.append(f"{name}: skipped ({reason})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
