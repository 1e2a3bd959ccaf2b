"""The lexical side of the catalog index (ecomserve.index.lexical): the tokenizer that keeps model numbers whole and
matches their parts, the BM25 wrapper (build, save/load, FILTER masking), its place in every committed version, and
the hybrid fusion (ecomserve.fusion.fuse_rankings)."""

from __future__ import annotations

import pytest

from ecomserve.fusion import fuse_rankings
from ecomserve.index.filters import parse_filter
from ecomserve.index.lexical import LEXICAL, LexicalIndex, item_text, tokenize
from ecomserve.spec import SearchSpec

TITLES = {
    "xm4": "Sony WH-1000XM4 wireless headphones",
    "xm5": "Sony WH-1000XM5 wireless headphones",
    "990-2tb": "Samsung 990 PRO 2TB NVMe SSD",
    "990-1tb": "Samsung 990 PRO 1TB NVMe SSD",
    "mug": "Enamel camping mug",
}
EXTRAS = {
    "xm4": {"brand": "Sony", "price": 279, "in_stock": True},
    "xm5": {"brand": "Sony", "price": 349, "in_stock": False},
    "990-2tb": {"brand": "Samsung", "text": "PCIe 4.0 drive", "attributes": {"capacity": "2 TB", "heatsink": True}},
    "990-1tb": {"brand": "Samsung", "attributes": {"capacity": "1 TB"}},
}


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("WH-1000XM4", ["wh-1000xm4", "wh1000xm4", "wh", "1000xm4", "1000", "xm4"]),
        ("990 pro 2tb", ["990", "pro", "2tb", "2", "tb"]),
        ("Samsung 990 PRO 2TB", ["samsung", "990", "pro", "2tb", "2", "tb"]),
        ("pampers size 3", ["pampers", "size", "3"]),
        ("USB-C cable, 2m!", ["usb-c", "usbc", "usb", "c", "cable", "2m", "2", "m"]),
        ("Kettle 1.7l", ["kettle", "1.7l", "17l", "1", "7l", "7", "l"]),
        ("Crème brûlée — set", ["crème", "brûlée", "set"]),
        ("  ", []),
    ],
)
def test_tokens_keep_model_numbers_whole_and_their_parts(text, tokens):
    assert tokenize(text) == tokens


def test_queries_written_any_way_reach_the_model_number():
    for query in ("WH-1000XM4", "wh1000xm4", "1000xm4", "wh 1000xm4"):
        assert {"wh1000xm4", "1000xm4"} & set(tokenize(query)), query


def test_item_text_is_title_brand_description_and_attribute_values():
    assert item_text(TITLES["990-2tb"], EXTRAS["990-2tb"]) == "Samsung 990 PRO 2TB NVMe SSD Samsung PCIe 4.0 drive 2 TB"
    assert item_text("mug", None) == "mug"


def test_bm25_puts_the_exact_model_number_first():
    index = LexicalIndex.build(TITLES, EXTRAS)
    for query, expected in [
        ("WH-1000XM4", "xm4"),
        ("wh1000xm5", "xm5"),
        ("1000xm4", "xm4"),
        ("990 pro 2tb", "990-2tb"),
        ("990 PRO 1TB", "990-1tb"),
    ]:
        found = index.search(query, 3)
        assert found[0][0] == expected, (query, found)
        assert len(found) == 1 or found[0][1] > found[1][1], (query, found)  # strictly ahead of its sibling
    assert index.search("zeppelin", 3) == []  # nothing shares a token: no lexical hits
    assert [item for item, _ in index.search("camping", 10)] == ["mug"]


def test_save_and_load_round_trip(tmp_path):
    index = LexicalIndex.build(TITLES, EXTRAS)
    index.save(tmp_path)
    assert (tmp_path / LEXICAL).is_dir()
    loaded = LexicalIndex.load(tmp_path, EXTRAS)
    assert loaded.ids == index.ids and len(loaded) == len(TITLES)
    for query in ("WH-1000XM4", "990 pro 2tb", "samsung pcie", "2 tb"):
        assert loaded.search(query, 5) == index.search(query, 5)
    assert LexicalIndex.load(tmp_path / "nowhere", EXTRAS) is None  # versions written before lexical search


def test_an_empty_catalog_saves_and_finds_nothing(tmp_path):
    LexicalIndex.build({}, {}).save(tmp_path)
    assert LexicalIndex.load(tmp_path, {}).search("anything", 5) == []


def test_a_filter_masks_non_matching_items_inside_retrieval():
    index = LexicalIndex.build(TITLES, EXTRAS)
    in_stock = parse_filter({"in_stock": True})
    assert [item for item, _ in index.search("sony wh-1000xm5", 5, in_stock)] == ["xm4"]  # xm5 is out of stock
    samsung = parse_filter({"brand": "Samsung", "attributes.capacity": "1 TB"})
    assert [item for item, _ in index.search("990 pro 2tb", 5, samsung)] == ["990-1tb"]
    assert index.search("sony", 5, parse_filter({"brand": "Nobody"})) == []
    assert index.allowed_rows(None) is None and index.allowed_rows(in_stock) is index.allowed_rows(in_stock)
    # k bounds the answer; scores stay best first
    found = index.search("sony samsung 990 wh", 2)
    assert len(found) == 2 and found[0][1] >= found[1][1]


def test_rrf_and_weighted_fusion():
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.1)]
    lexical = [("c", 12.0), ("d", 3.0)]
    rrf = fuse_rankings([dense, lexical], [1.0, 1.0], "rrf", 60)
    assert [item for item, _ in rrf] == ["c", "a", "b", "d"]
    assert rrf[0][1] == pytest.approx(1 / 63 + 1 / 61)
    assert rrf[1][1] == pytest.approx(1 / 61)
    # Lexical weight 0: dense order, lexical-only items last.
    assert [item for item, _ in fuse_rankings([dense, lexical], [1.0, 0.0], "rrf", 60)][:3] == ["a", "b", "c"]
    weighted = dict(fuse_rankings([dense, lexical], [1.0, 1.0], "weighted", 60))
    assert weighted["a"] == pytest.approx(0.5) and weighted["c"] == pytest.approx(0.5) and weighted["d"] == 0.0
    assert weighted["b"] == pytest.approx(0.5 * 0.7 / 0.8)
    assert fuse_rankings([[], []], [1.0, 1.0], "rrf", 60) == []
    with pytest.raises(ValueError, match="unknown fusion mode"):
        fuse_rankings([dense], [1.0], "max", 60)


def test_search_defaults_to_hybrid_with_rrf():
    spec = SearchSpec()
    assert spec.mode == "hybrid" and spec.fusion.mode == "rrf" and spec.fusion.rrf_k == 60
    # A digit anywhere in the query (a model number, size or capacity) gives BM25 the dense list's weight.
    fusion = spec.fusion
    assert fusion.number_lexical_weight == 1.0 and fusion.lexical_weight < fusion.number_lexical_weight
    for query in ("990 pro 2tb", "WH-1000XM4", "pampers size 3", "x1"):
        assert fusion.lexical_weight_for(query) == fusion.number_lexical_weight, query
    for query in ("gift for coffee lover", "ASICS", ""):
        assert fusion.lexical_weight_for(query) == fusion.lexical_weight, query
    with pytest.raises(ValueError, match="mode"):
        SearchSpec(mode="fuzzy")
