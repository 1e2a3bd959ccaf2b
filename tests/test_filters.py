"""Catalog items with fields and the FILTER language: reading catalogs (JSONL and CSV, line numbers, strict types),
parsing and matching filters, their Milvus expressions (escaping), and filtered searches inside each index backend
(faiss exact, faiss HNSW with its exact fallback, Milvus Lite) against brute force within the filter."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from ecomserve.errors import InvalidInput
from ecomserve.index import faiss_index
from ecomserve.index.catalog import CatalogError, CatalogItem, Manifest, read_catalog, read_items, write_items
from ecomserve.index.faiss_index import FaissIndex
from ecomserve.index.filters import FILTER_MAX_BYTES, Condition, ItemFilter, parse_filter
from ecomserve.index.milvus_index import MilvusIndex
from ecomserve.index.milvus_lite import MilvusLiteServer, start_milvus_lite
from ecomserve.spec import FaissSpec, MilvusSpec

# ---------------------------------------------------------------------------------------------------------------
# Catalog files


def test_jsonl_items_carry_their_fields(tmp_path):
    path = tmp_path / "items.jsonl"
    rows = [
        {
            "id": "a",
            "title": "gel running shoe",
            "text": "cushioned",
            "category": "shoes",
            "brand": "ASICS",
            "price": 129.5,
            "in_stock": True,
            "attributes": {"color": "black", "size": 42, "wide": False},
            "url": "https://shop.example/a",  # an unknown field: ignored
        },
        {"id": "b", "title": "mug", "price": 7},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    first, second = read_catalog(path)
    assert first == CatalogItem(
        "a",
        "gel running shoe",
        "cushioned",
        "shoes",
        "ASICS",
        129.5,
        True,
        {"color": "black", "size": 42, "wide": False},
    )
    assert first.filter_fields() == {
        "category": "shoes",
        "brand": "ASICS",
        "price": 129.5,
        "in_stock": True,
        "attributes": {"color": "black", "size": 42, "wide": False},
    }
    assert first.extras() == {"text": "cushioned", **first.filter_fields()}
    assert second == CatalogItem("b", "mug", price=7) and second.extras() == {"price": 7}
    assert CatalogItem.with_extras("a", "gel running shoe", first.extras()) == first


def test_csv_items_follow_the_column_conventions(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text(
        "id,title,brand,price,in_stock,attributes.color,attributes.size,attributes.wide,attributes.fit,notes\n"
        "a,gel running shoe,ASICS,129.50,true,black,42,false,,anything\n"
        'b,"mug, large",,7,0,,,,"regular",\n'
        "c,lamp,,,,,,,,\n"
    )
    a, b, c = read_catalog(path)
    assert a == CatalogItem(
        "a",
        "gel running shoe",
        brand="ASICS",
        price=129.5,
        in_stock=True,
        attributes={"color": "black", "size": 42, "wide": False},
    )
    assert b == CatalogItem("b", "mug, large", price=7, in_stock=False, attributes={"fit": "regular"})
    assert c == CatalogItem("c", "lamp") and c.extras() == {}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "x", "title": "t", "price": "12"}', "'price' must be a number"),
        ('{"id": "x", "title": "t", "price": true}', "'price' must be a number"),
        ('{"id": "x", "title": "t", "price": -1}', "'price' -1 is out of range"),
        ('{"id": "x", "title": "t", "in_stock": "yes"}', "'in_stock' must be true or false"),
        ('{"id": "x", "title": "t", "in_stock": 1}', "'in_stock' must be true or false"),
        ('{"id": "x", "title": "t", "brand": 3}', "'brand' must be a string"),
        ('{"id": "x", "title": "t", "category": ["a"]}', "'category' must be a string"),
        ('{"id": "x", "title": "t", "attributes": ["black"]}', "'attributes' must be an object"),
        ('{"id": "x", "title": "t", "attributes": {"color": {"r": 1}}}', "attribute 'color' must be a string"),
        ('{"id": "x", "title": "t", "attributes": {"a.b": "x"}}', "attribute name 'a.b'"),
        ('{"id": "x", "title": "t", "brand": "' + "B" * 300 + '"}', "'brand' is 300 bytes, at most 256"),
        (
            '{"id": "x", "title": "t", "attributes": ' + json.dumps({f"k{i}": i for i in range(33)}) + "}",
            "33 attributes",
        ),
        ('{"id": "x"}', "every item needs a non-empty 'id' and 'title'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_jsonl_rows_are_refused_with_their_line(tmp_path, line, message):
    path = tmp_path / "items.jsonl"
    path.write_text('{"id": "ok", "title": "fine", "brand": "ASICS"}\n\n' + line + "\n")
    with pytest.raises(CatalogError) as refused:
        list(read_catalog(path))
    assert f"items.jsonl:3: {message}" in str(refused.value)


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        ("$12,true,", "'price' must be a plain decimal"),
        ("1_000,true,", "'price' must be a plain decimal"),
        ("nan,true,", "'price' must be a plain decimal"),
        ("12,yes,", "'in_stock' must be true, false, 1 or 0"),
    ],
)
def test_bad_csv_rows_are_refused_with_their_line(tmp_path, cells, message):
    path = tmp_path / "items.csv"
    path.write_text(f'id,title,price,in_stock,attributes.color\nok,"fine,\nand long",1,true,red\nx,t,{cells}\n')
    with pytest.raises(CatalogError) as refused:
        list(read_catalog(path))
    assert f"items.csv:4: {message}" in str(refused.value)  # the quoted title spans lines 2 and 3


def test_items_json_is_optional_for_older_indexes(tmp_path):
    manifest = Manifest("faiss", 1, 8, version=1, items=1, data="v1-00000000")
    (tmp_path / manifest.data).mkdir()
    assert read_items(tmp_path, manifest) == {}
    write_items(tmp_path / manifest.data, {"a": {"brand": "ASICS"}, "b": {}})
    assert read_items(tmp_path, manifest) == {"a": {"brand": "ASICS"}}


# ---------------------------------------------------------------------------------------------------------------
# The filter language


def test_filters_parse_into_conditions():
    parsed = parse_filter(
        '{"brand": {"in": ["Yeti", "Hydro Flask"]}, "price": {"gte": 50, "lte": 300}, "in_stock": true, '
        '"attributes.color": "black", "category": "shoes"}'
    )
    assert set(parsed.conditions) == {
        Condition("brand", "in", ("Yeti", "Hydro Flask")),
        Condition("price", "gte", 50),
        Condition("price", "lte", 300),
        Condition("in_stock", "eq", True),
        Condition("attributes.color", "eq", "black"),
        Condition("category", "eq", "shoes"),
    }
    assert parse_filter(b"{}") is None and parse_filter({}) is None
    assert parse_filter({"brand": "A", "price": {"lt": 3}}).key == parse_filter({"price": {"lt": 3}, "brand": "A"}).key
    assert parse_filter({"brand": "A"}).key != parse_filter({"brand": "B"}).key


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"colour": "black"}', "unknown field 'colour'"),
        ('{"attributes": {"color": "black"}}', "unknown field 'attributes'"),
        ('{"attributes.": "black"}', "bad attribute name"),
        ('{"price": {"between": [1, 2]}}', "unknown operator 'between'"),
        ('{"price": {}}', "empty operator object"),
        ('{"brand": 3}', "field 'brand': expected a string, got a number"),
        ('{"price": "cheap"}', "field 'price': expected a number, got a string"),
        ('{"price": true}', "field 'price': expected a number, got a boolean"),
        ('{"price": {"gte": "50"}}', "'gte': expected a number, got a string"),
        ('{"brand": {"gte": 5}}', "ranges apply to numbers"),
        ('{"in_stock": "yes"}', "field 'in_stock': expected true or false"),
        ('{"in_stock": 1}', "field 'in_stock': expected true or false"),
        ('{"brand": {"in": "ASICS"}}', "'in': expected a non-empty list"),
        ('{"brand": {"in": []}}', "'in': expected a non-empty list"),
        ('{"brand": {"in": ["A", 1]}}', "'in': expected a string, got a number"),
        ('{"attributes.size": {"in": [1, [2]]}}', "got a list"),
        ('{"attributes.color": null}', "got null"),
        ('{"price": NaN}', "out of range"),
        ('{"price": {"lt": 1e300}}', "out of range"),
        ('{"brand": ', "malformed JSON"),
        ("", "malformed JSON"),
        ('["brand"]', "expected a JSON object"),
        ('"ASICS"', "expected a JSON object"),
        ("[" * 5000 + "]" * 5000, f"at most {FILTER_MAX_BYTES}"),
        ("[" * 2000 + "]" * 2000, "nested too deep"),
        (json.dumps({f"attributes.a{i}": i for i in range(17)}), "17 fields, at most 16"),
        (json.dumps({"brand": {"in": [str(i) for i in range(257)]}}), "257 values, at most 256"),
        (b"\xff\xfe", "not valid UTF-8"),
    ],
)
def test_bad_filters_name_what_is_wrong(value, message):
    with pytest.raises(InvalidInput) as refused:
        parse_filter(value)
    assert str(refused.value).startswith("FILTER") and message in str(refused.value)


def test_matching_compares_within_a_kind():
    item = {"brand": "ASICS", "price": 129.5, "in_stock": True, "attributes": {"size": 42, "wide": True, "code": "42"}}
    assert parse_filter({"brand": "ASICS", "price": {"gt": 100, "lte": 129.5}}).matches(item)
    assert not parse_filter({"brand": "asics"}).matches(item)  # exact, case-sensitive
    assert parse_filter({"attributes.size": 42.0}).matches(item)
    assert not parse_filter({"attributes.size": "42"}).matches(item)
    assert parse_filter({"attributes.code": "42"}).matches(item)
    assert not parse_filter({"attributes.wide": 1}).matches(item)  # a boolean is not a number
    assert not parse_filter({"attributes.size": True}).matches(item)
    assert not parse_filter({"attributes.code": {"gte": 1}}).matches(item)  # ranges only over numbers
    assert not parse_filter({"category": "shoes"}).matches(item)  # a missing field never matches
    assert not parse_filter({"attributes.color": {"in": ["black"]}}).matches(item)
    assert not parse_filter({"brand": "ASICS"}).matches(None)


def test_milvus_expressions_escape_every_string():
    where = ItemFilter(
        (
            Condition("brand", "eq", "Qu\"o\\te's"),
            Condition('attributes.scr"een', "in", ("a", 1, True, 2.5)),
            Condition("price", "gte", 1e-7),
            Condition("price", "lt", 1e15),
        )
    )
    assert where.milvus_expression() == (
        r'(fields["brand"] == "Qu\"o\\te' + "'" + r's") and '
        r'(fields["attributes"]["scr\"een"] in ["a", 1, true, 2.5]) and '
        '(fields["price"] >= 0.0000001) and (fields["price"] < 1000000000000000.0)'
    )
    assert parse_filter({"brand": "é\n"}).milvus_expression("f") == '(f["brand"] == "é\\n")'


# ---------------------------------------------------------------------------------------------------------------
# Filtered searches inside the index backends

DIM, ITEMS, K = 16, 3_000, 10
BRANDS = ["ASICS", "Yeti", "Hydro Flask", 'Qu"ote\\d']


def fields_of(i: int) -> dict:
    found = {
        "brand": "Rare" if i in (5, 1500, 2999) else BRANDS[i % 4],
        "price": round((i * 37) % 500 + 0.5, 2),
        "in_stock": i % 3 != 0,
        "attributes": {"color": ["black", "red"][i % 2], "size": i % 12},
    }
    return {} if i % 50 == 7 else found  # some items have no fields at all


FILTERS = [
    {"brand": "ASICS"},
    {"brand": {"in": ["Yeti", 'Qu"ote\\d']}},
    {"price": {"gte": 50, "lte": 300}},
    {"price": {"gt": 480}, "in_stock": True},
    {"attributes.color": "black", "attributes.size": {"lt": 2}},
    {"brand": "Rare"},  # 3 items
    {"brand": "Nobody"},  # none
]


@pytest.fixture(scope="module")
def milvus(tmp_path_factory) -> Iterator[MilvusLiteServer]:
    with start_milvus_lite(tmp_path_factory.mktemp("milvus") / "catalog.db") as server:
        yield server


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((ITEMS, DIM)).astype(np.float32)
    queries = rng.standard_normal((4, DIM)).astype(np.float32)
    return (
        [f"sku-{i}" for i in range(ITEMS)],
        vectors / np.linalg.norm(vectors, axis=1, keepdims=True),
        queries / np.linalg.norm(queries, axis=1, keepdims=True),
        [fields_of(i) for i in range(ITEMS)],
    )


@pytest.fixture(params=["faiss-exact", "faiss-hnsw", "milvus"])
def index(request, data, tmp_path):
    ids, vectors, _, fields = data
    if request.param == "milvus":
        spec = MilvusSpec(uri=request.getfixturevalue("milvus").uri, collection=f"f_{uuid.uuid4().hex}")
        made = MilvusIndex(spec, DIM)
    else:
        exact_below = 100_000 if request.param == "faiss-exact" else 500
        made = FaissIndex(DIM, FaissSpec(exact_below=exact_below), tmp_path / "index")
    for start in range(0, ITEMS, 1000):
        made.upsert(ids[start : start + 1000], vectors[start : start + 1000], fields[start : start + 1000])
    if request.param == "faiss-hnsw":
        assert made.kind == "hnsw"
    return made


def within(data, where: ItemFilter | None, k: int) -> list[list[str]]:
    ids, vectors, queries, fields = data
    rows = [i for i in range(ITEMS) if where is None or where.matches(fields[i])]
    scores = queries @ vectors[rows].T
    return [[ids[rows[j]] for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def check(index, data, raw: dict, k: int = K, exact: bool = True) -> None:
    where = parse_filter(raw)
    ids, _, queries, fields = data
    matching = sum(where.matches(f) for f in fields)
    found = index.search(queries, k, where)
    expected = within(data, where, k)
    for hits, want in zip(found, expected):
        assert len(hits) == min(k, matching), raw
        assert all(where.matches(fields[int(item.split("-")[1])]) for item, _ in hits), raw
        assert [score for _, score in hits] == sorted((score for _, score in hits), reverse=True)
        if exact:
            assert [item for item, _ in hits] == want, raw
        else:
            assert len({item for item, _ in hits} & set(want)) >= 0.8 * len(want), raw


def test_filtered_search_returns_the_best_matching_items(index, data):
    for raw in FILTERS:
        # HNSW over a broad filter is approximate, like unfiltered HNSW; selective ones are answered exactly.
        check(index, data, raw, exact=not (isinstance(index, FaissIndex) and index.kind == "hnsw"))


def test_hnsw_answers_short_filtered_searches_exactly(data, tmp_path, monkeypatch):
    """Forced through the selector even for 3 matching items: HNSW comes back short, the exact fallback fills in."""
    ids, vectors, queries, fields = data
    made = FaissIndex(DIM, FaissSpec(exact_below=500), tmp_path / "index")
    made.upsert(ids, vectors, fields)
    monkeypatch.setattr(faiss_index, "EXACT_FILTERED_BELOW", 0)
    for raw in ({"brand": "Rare"}, {"attributes.size": 3, "in_stock": True}, {"brand": "ASICS"}):
        check(made, data, raw, exact=raw == {"brand": "Rare"})  # 3 items: all of them, best first


def test_upserts_replace_fields_and_deletes_remove_them(index, data):
    ids, vectors, queries, _ = data
    rare = parse_filter({"brand": "Rare"})
    index.upsert(["sku-5"], vectors[5:6], [{"brand": "Common"}])  # replaced: no longer Rare
    index.upsert(["sku-new"], vectors[6:7], [{"brand": "Rare", "price": 1}])
    index.upsert(["sku-bare"], vectors[7:8])  # no fields: never matches a filter
    index.delete(["sku-1500"])
    found = {item for item, _ in index.search(queries[:1], K, rare)[0]}
    assert found == {"sku-new", "sku-2999"}
    assert "sku-bare" in {item for item, _ in index.search(vectors[7:8], 2)[0]}  # sku-7 has the same vector
    if isinstance(index, FaissIndex):
        index.save()
        reopened = FaissIndex.open(index.directory, DIM, index.spec)
        assert {item for item, _ in reopened.search(queries[:1], K, rare)[0]} == found


def test_faiss_indexes_saved_before_fields_open_with_none(data, tmp_path):
    ids, vectors, queries, _ = data
    made = FaissIndex(DIM, FaissSpec(), tmp_path / "index")
    made.upsert(ids[:100], vectors[:100])
    folder = made.save()
    (folder / "fields.json").unlink()
    reopened = FaissIndex.open(tmp_path / "index", DIM)
    assert len(reopened.search(queries, K)[0]) == K
    assert reopened.search(queries, K, parse_filter({"brand": "ASICS"})) == [[] for _ in queries]
