"""TREC run files: ``qid Q0 docid rank score tag``, one line per retrieved document."""

from __future__ import annotations

import os
from typing import Mapping

from .io import atomic_path
from .metrics import ranked


def write_trec_run(run: Mapping[str, Mapping[str, float]], path: str | os.PathLike, tag: str) -> None:
    if not tag or any(c.isspace() for c in tag):
        raise ValueError(f"run tag {tag!r} must be a non-empty word without whitespace")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for qid in sorted(run):
            scores = run[qid]
            # Full precision (repr): trec_eval ranks by score, so rounding would turn near-ties into ties.
            for rank, doc in enumerate(ranked(scores), start=1):
                out.write(f"{qid} Q0 {doc} {rank} {float(scores[doc])!r} {tag}\n")


def read_trec_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 6:
                raise ValueError(f"{path}:{number}: expected 6 fields 'qid Q0 docid rank score tag', got {len(fields)}")
            qid, _, doc, _, score, _ = fields
            try:
                run.setdefault(qid, {})[doc] = float(score)
            except ValueError:
                raise ValueError(f"{path}:{number}: score {score!r} is not a number") from None
    return run
