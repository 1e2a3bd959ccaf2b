"""Query and passage prompts (`encoders[].prompts` in the spec), put before a text where the server
embeds it for a role: rank's QUERY and search's QUERY get the query prompt, rank's CANDIDATES and the
catalog titles of an index (build, upsert, search's rerank) the passage prompt. `embed` itself adds no
prompt: it takes one text for every encoder, and the caller (the HTTP API) knows the role.

Limits apply to the client's text, before its prompt: rank and search check their inputs against
limits.max_text_bytes first, and the models behind `embed` accept that many bytes plus the longest prompt
(`prompt_bytes`), so a prompted text of allowed length is never refused there. The prompt's tokens count
towards max_seq_len, as in sentence-transformers: a text that fills it is truncated at its end."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

QUERY_PROMPT, PASSAGE_PROMPT = "query", "passage"  # the keys of a pipeline's prompts


def with_prompt(prompts: Mapping[str, str], kind: str | None, texts: Iterable[str]) -> list[str]:
    """`texts`, each with the `kind` prompt before it (unchanged when the pipeline has none, or kind is None)."""
    prompt = prompts.get(kind, "") if kind else ""
    return [prompt + text for text in texts]


def prompt_bytes(prompts: Mapping[str, str]) -> int:
    """How many bytes a prompt may add to a text: the UTF-8 length of the longest prompt."""
    return max((len(prompt.encode("utf-8")) for prompt in prompts.values()), default=0)
