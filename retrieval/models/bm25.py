"""BM25 as a model family: nothing to train; its index is the Lucene index the mine stage builds."""

from __future__ import annotations

TRAINABLE = False

