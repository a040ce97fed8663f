"""Stage `queries`: put every query into the form the retrievers see (params `query.format`), once, so that
mine, train, evaluate and rerank all use the same text."""

import os

import click

from retrieval.dataset import load_beir
from retrieval.io import write_jsonl
from retrieval.query_format import FORMATS, count_words, format_queries

from .common import FORMATTED_QUERIES, REWRITE_CACHE, load_params, params_option, raw_dir, section


def _token_counter(params: dict):
    """Count tokens with the tokenizer of the model family's base model when it has one (its real budget)."""
    family = str(section(params, "model"))
    base = (params.get("models", {}).get(family) or {}).get("base_model")
    if not base:
        return count_words
    from transformers import AutoTokenizer

    from retrieval.hub import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(str(base)))
    return lambda text: len(tokenizer.tokenize(text))


@click.command("queries")
@params_option
def command(params_path: str) -> None:
    """Format the dataset's queries (last_turn, full_history, last_k or rewrite) into data/queries/."""
    params = load_params(params_path)
    query = section(params, "query")
    fmt = str(query.get("format", "last_turn"))
    if fmt not in FORMATS:
        raise click.ClickException(f"params.yaml: query.format {fmt!r} is not one of {', '.join(FORMATS)}")
    dataset = load_beir(raw_dir(params))
    REWRITE_CACHE.parent.mkdir(parents=True, exist_ok=True)
    REWRITE_CACHE.touch()  # a DVC output even when nothing is rewritten
    rewriter = None
    llm = query.get("rewriter") or {}
    if fmt == "rewrite" and llm.get("base_url"):
        from retrieval.rewrite import Rewriter

        rewriter = Rewriter(str(llm["base_url"]), str(llm["model"]), REWRITE_CACHE,
                            api_key=os.environ.get(str(llm.get("api_key_env", "OPENAI_API_KEY"))),
                            temperature=float(llm.get("temperature", 0.0)))
    multi_turn = fmt in ("full_history", "last_k")
    try:
        texts = format_queries(
            dataset.queries, fmt, last_k=int(query.get("last_k", 3)),
            max_tokens=query.get("max_tokens") if multi_turn else None,
            count_tokens=_token_counter(params) if multi_turn and query.get("max_tokens") else None,
            rewriter=rewriter,
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    count = write_jsonl(({"_id": qid, "text": text} for qid, text in texts.items()), FORMATTED_QUERIES)
    click.echo(f"queries: {count} formatted as {fmt}")
