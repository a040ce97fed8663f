"""Time every stage of the pipeline, in order, on the current params (forces each stage to run).

    RETRIEVAL_DATA_MIRROR=../shared/datasets python benchmarks/time_stages.py [--out benchmarks/results/stages.json]

Wall-clock seconds per stage and in total; peak resident memory of each stage's process tree is read from
`/usr/bin/time -v` when present. Run it on an otherwise idle machine: the numbers are what the README quotes.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import yaml

STAGE_ORDER = ["download", "queries", "split", "mine", "train", "index_baseline", "index_finetuned", "evaluate",
               "train_reranker", "rerank"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/stages.json")
    parser.add_argument("--stages", nargs="*", default=STAGE_ORDER)
    args = parser.parse_args()
    gnu_time = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    results = {"machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
               "params": yaml.safe_load(Path("params.yaml").read_text()), "stages": {}}
    total = 0.0
    for stage in args.stages:
        cmd = ["dvc", "repro", "--single-item", "--force", stage]
        if gnu_time:
            cmd = [gnu_time, "-v", *cmd]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        results["stages"][stage] = {"seconds": round(seconds, 1),
                                    "peak_rss_mb": round(int(peak.group(1)) / 1024) if peak else None}
        total += seconds
        print(f"{stage:16s} {seconds:8.1f} s", flush=True)
    results["total_seconds"] = round(total, 1)
    print(f"{'total':16s} {total:8.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
