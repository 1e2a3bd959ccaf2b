"""A release's retrieval quality, measured from its files before it may go live.

NDCG@5 on the shipped eval set (ecomserve/data/eval/relevance.json), ranking every product title by the dot
product of fused embeddings — what `rank` computes with weighted_mean fusion — with the same runners
and fusion the server uses, in this process."""

from __future__ import annotations

from pathlib import Path

from ecomserve.evaluation import load_eval_set, mean_ndcg
from ecomserve.prompts import PASSAGE_PROMPT, QUERY_PROMPT, with_prompt
from ecomserve.repository.builder import built_spec
from ecomserve.repository.inprocess import release_embedder
from ecomserve.spec import PipelineSpec


def release_ndcg(repository: Path, release: int, spec: PipelineSpec | None = None) -> float:
    """NDCG@5 of `release` in `repository`; `spec` defaults to the one the repository was built from."""
    spec = spec or built_spec(repository)
    embed = release_embedder(repository, release, spec)
    eval_set = load_eval_set()
    # With the query and passage prompts, as `rank` embeds its QUERY and CANDIDATES.
    titles = embed(with_prompt(spec.prompts, PASSAGE_PROMPT, eval_set.titles))
    queries = embed(with_prompt(spec.prompts, QUERY_PROMPT, [q.text for q in eval_set.queries]))
    by_query = {q.text: vector for q, vector in zip(eval_set.queries, queries)}
    return mean_ndcg(eval_set, lambda query, _items: titles @ by_query[query])
