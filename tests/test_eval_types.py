"""Issue 17's typed eval set (ecomserve/data/eval/typed.json): that it is well-formed, NDCG@5 per query type
(semantic, lexical, filtered) × search mode (dense, lexical, hybrid) on the default MiniLM pipeline's `search`, and
of `similar` on its similar-item judgments (plain and with DIVERSITY).

    pytest tests/test_eval_types.py -k table -s

prints the table README's "Quality so far" shows. Hybrid with other lexical weights is fused here from the same
server's dense and lexical lists with ecomserve.fusion.fuse_rankings, as `search` fuses them (its spec's defaults are
checked to give the server's own hybrid answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from support import client_for, wait_for

from ecomserve.errors import RequestFailed
from ecomserve.evaluation import (
    QUERY_TYPES,
    TypedQuery,
    format_table,
    load_typed_eval_set,
    ranked_ndcg,
    typed_ndcg,
)
from ecomserve.fusion import fuse_rankings
from ecomserve.index.catalog import CatalogItem
from ecomserve.index.filters import parse_filter
from ecomserve.index.ops import build_index, index_dir
from ecomserve.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
TOP_K = 10
# Hybrid with one lexical weight for every query (words only, or with a number), beside the spec's two.
ONE_WEIGHT = (1.0, 0.3, 0.1)
SIMILAR_DIVERSITY = (0.0, 0.3)


def catalog_item(product: dict) -> CatalogItem:
    return CatalogItem.with_extras(
        product["id"], product["title"], {k: v for k, v in product.items() if k not in ("id", "title")}
    )


def test_the_typed_eval_set_is_well_formed():
    eval_set = load_typed_eval_set()
    items = {item.id: item for item in map(catalog_item, eval_set.products)}
    assert len(items) == len(eval_set.products), "duplicate product ids"
    assert {q.type for q in eval_set.queries} == set(QUERY_TYPES)
    assert len(eval_set.of_type("semantic")) == 20  # relevance.json's, unchanged
    typed = [q for q in eval_set.queries if q.type != "semantic"]
    assert len({(q.text, json.dumps(q.filter, sort_keys=True)) for q in typed}) == len(typed), "duplicate queries"
    for query in eval_set.queries:
        assert set(query.relevance) <= set(items), f"{query.text!r} judges unknown ids"
        assert query.relevance and all(grade in (1, 2, 3) for grade in query.relevance.values()), query.text
        assert (query.filter is not None) == (query.type == "filtered"), query.text
        if query.type == "lexical":
            assert sorted(set(query.relevance.values())) in ([1, 2], [2]), f"{query.text!r}: exact 2, siblings 1"
        if query.filter is not None:
            where = parse_filter(json.dumps(query.filter))
            assert where is not None, query.text
            for item_id in query.relevance:
                assert where.matches(items[item_id].filter_fields()), f"{query.text!r}: {item_id} fails its filter"
            # Ranking within the filter matters: not every item it matches has the best grade.
            best = max(query.relevance.values())
            within = [item_id for item_id, item in items.items() if where.matches(item.filter_fields())]
            assert any(query.relevance.get(item_id, 0) < best for item_id in within), f"{query.text!r} is trivial"
    assert len(eval_set.similar) >= 10
    for judgment in eval_set.similar:
        assert judgment.item_ids and set(judgment.item_ids) <= set(items), judgment
        assert not set(judgment.relevance) & set(judgment.item_ids), f"{judgment.item_ids}: an input is judged"
        assert set(judgment.relevance) <= set(items) and 2 in judgment.relevance.values(), judgment
        assert all(grade in (1, 2) for grade in judgment.relevance.values()), judgment


PROBE, PROBE_ID = "Sony WH-1000XM4", "d001"  # a typed.json product: tells which catalog the server answers from


@pytest.mark.integration
def test_the_typed_ndcg_table(default_server):
    """The per-type NDCG@5 table (README, "Quality so far"); hybrid (defaults) beats dense on the lexical queries.

    Semantic queries run over relevance.json's 60 products (as tests/test_search.py's keeps_the_ndcg), lexical and
    filtered ones over those plus typed.json's 50 near-duplicates."""
    spec = load_spec(ROOT / "export/default.yaml")
    fusion = spec.search.fusion
    repository = default_server.options.repository
    eval_set = load_typed_eval_set()
    semantic_ids = set(eval_set.semantic.product_ids)
    catalogs = {
        "semantic": [p for p in eval_set.products if p["id"] in semantic_ids],
        "typed": eval_set.products,
    }
    lists: dict[tuple[str, str], list[tuple[str, float]]] = {}  # (query key, mode) → (id, score) best first
    similar: dict[str, list[float]] = {f"diversity {d}": [] for d in SIMILAR_DIVERSITY}  # NDCG@5 per judgment

    def key(query: TypedQuery) -> str:
        return f"{query.type}|{query.text}|{json.dumps(query.filter, sort_keys=True)}"

    with client_for(default_server, "grpc") as client:

        def answers_from(holds: set[str]) -> bool:
            try:
                ids = set(client.search(PROBE, top_k=TOP_K, mode="lexical").ids)
            except RequestFailed:  # no index loaded yet
                return False
            return ids <= holds and (PROBE_ID in ids) == (PROBE_ID in holds)

        for catalog, queries in (
            ("semantic", eval_set.of_type("semantic")),
            ("typed", [q for q in eval_set.queries if q.type != "semantic"]),
        ):
            products = catalogs[catalog]
            items = [catalog_item(p) for p in products]
            build_index(spec, repository, items, index_dir(spec, repository.parent), Console(stderr=True))
            holds = {item.id for item in items}
            assert wait_for(lambda holds=holds: answers_from(holds), timeout_s=10), catalog
            for query in queries:
                # dense and lexical as hybrid retrieves them (its `candidates` each), hybrid as a shopper asks.
                for mode, top_k in (("dense", fusion.candidates), ("lexical", fusion.candidates), ("hybrid", TOP_K)):
                    found = client.search(query.text, top_k=top_k, filter=query.filter, mode=mode)
                    lists[key(query), mode] = list(zip(found.ids, map(float, found.scores)))
        for judgment in eval_set.similar:  # the typed catalog is the live one now
            for diversity in SIMILAR_DIVERSITY:
                found = client.similar(judgment.item_ids, top_k=TOP_K, diversity=diversity)
                similar[f"diversity {diversity}"].append(ranked_ndcg(found.ids, judgment.relevance))

    def fused(query: TypedQuery, lexical_weight: float) -> list[str]:
        rankings = [lists[key(query), "lexical"], lists[key(query), "dense"]]
        return [item for item, _ in fuse_rankings(rankings, [lexical_weight, 1.0], fusion.mode, fusion.rrf_k)][:TOP_K]

    # The offline fusion is the server's: with the spec's weights it gives the server's hybrid answers.
    for query in eval_set.queries:
        server = [item for item, _ in lists[key(query), "hybrid"]]
        assert fused(query, fusion.lexical_weight_for(query.text)) == server, query.text

    weighted = {f"hybrid, one weight {w}": w for w in ONE_WEIGHT}

    def ranked(query: TypedQuery, mode: str) -> list[str]:
        if mode in weighted:
            return fused(query, weighted[mode])
        return [item for item, _ in lists[key(query), mode]][:TOP_K]

    table = typed_ndcg(eval_set.queries, ranked, ["dense", "lexical", "hybrid", *weighted])
    counts = {t: len(eval_set.of_type(t)) for t in QUERY_TYPES}
    print(
        f"\nNDCG@5, hybrid = spec defaults ({fusion.mode}, rrf_k {fusion.rrf_k}, lexical_weight "
        f"{fusion.lexical_weight}, number_lexical_weight {fusion.number_lexical_weight}); queries per type in ()\n"
        f"{format_table(table, counts)}"
    )
    print(json.dumps(table))
    similar_ndcg = {name: float(sum(scores) / len(scores)) for name, scores in similar.items()}
    print(f"similar ({len(eval_set.similar)} judgments), NDCG@5: {json.dumps(similar_ndcg)}")
    assert similar_ndcg["diversity 0.0"] >= 0.7  # the same kind of product first, for items and histories
    # Issue 17's bar for the default mode: no more than 0.01 lost on semantic queries, a clear win on lexical ones.
    assert spec.search.mode == "hybrid"
    assert table["semantic"]["hybrid"] >= table["semantic"]["dense"] - 0.01
    # "Clear" near the ceiling: hybrid closes at least half of what dense misses (the full MiniLM's dense 0.915 →
    # hybrid 0.991; the distilled student, which learned model numbers from its corpus, 0.960 → 0.995).
    lexical_dense = table["lexical"]["dense"]
    assert table["lexical"]["hybrid"] - lexical_dense >= 0.5 * (1 - lexical_dense) > 0
    assert table["filtered"]["hybrid"] >= table["filtered"]["dense"] - 0.01
