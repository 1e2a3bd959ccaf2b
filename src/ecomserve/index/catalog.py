"""The catalog side of an index: reading catalog files, item titles, and the manifest that versions
an index folder.

An index folder holds the manifest (`index.json`) and version folders; each version folder is complete
and never changed once written (titles and, for faiss, the vectors). The manifest names the live one,
so replacing it is the single commit point of every write: a reader that loads what it names sees one
version, never a mix. It also says which release of the encoders embedded the vectors, with which passage
prompt, and counts every change: the `search` model re-reads the index when `version` moves, answers only
with queries embedded by the same `release` and prompts, and keys its result cache by both."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ecomserve.errors import EcomserveError
from ecomserve.files import write_text_atomically
from ecomserve.index.filters import (
    ATTRIBUTE_MAX,
    ATTRIBUTE_NAME,
    ATTRIBUTE_NAME_MAX_BYTES,
    ATTRIBUTES,
    NUMBER_MAX,
    STRING_FIELDS,
    VALUE_MAX_BYTES,
)

MANIFEST = "index.json"
TITLES = "titles.json"
ITEMS = "items.json"  # each item's fields beyond its title (`CatalogItem.extras`); absent in older indexes
TEXT_MAX_BYTES = 16_384  # an item's description
WRITER_WAIT_S = 30.0  # how long an index writer waits for another one (a build) to finish


class CatalogError(EcomserveError):
    """A catalog file or index folder the user has to fix."""


@dataclass(frozen=True)
class CatalogItem:
    id: str
    title: str
    text: str | None = None  # description
    category: str | None = None
    brand: str | None = None
    price: float | int | None = None
    in_stock: bool | None = None
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)

    def extras(self) -> dict:
        """The fields beyond id and title that the item has (what items.json keeps)."""
        found = {"text": self.text, **self.filter_fields()}
        return {name: value for name, value in found.items() if value is not None}

    def filter_fields(self) -> dict:
        """What FILTER can match (ecomserve.index.filters), without absent fields: what the index backends store."""
        found = {"category": self.category, "brand": self.brand, "price": self.price, "in_stock": self.in_stock}
        if self.attributes:
            found[ATTRIBUTES] = dict(self.attributes)
        return {name: value for name, value in found.items() if value is not None}

    @classmethod
    def with_extras(cls, item_id: str, title: str, extras: dict | None) -> CatalogItem:
        extras = dict(extras or {})
        return cls(item_id, title, **{**extras, ATTRIBUTES: dict(extras.get(ATTRIBUTES) or {})})


def filter_fields(extras: dict | None) -> dict:
    """The filterable part of an items.json entry."""
    return {name: value for name, value in (extras or {}).items() if name != "text"}


@dataclass(frozen=True)
class Manifest:
    backend: str
    release: int  # the encoders' release that embedded every vector
    dim: int
    version: int  # +1 on every build, upsert or delete
    items: int
    data: str  # the version folder inside the index folder
    passage_prompt: str = ""  # put before every title when embedded (spec prompts.passage); "" before prompts


def version_dir(index_dir: Path, manifest: Manifest) -> Path:
    return index_dir / manifest.data


def read_catalog(path: Path) -> Iterator[CatalogItem]:
    """Items from JSONL (one object per line) or CSV (header row). `id` and `title` are required; `text`,
    `category`, `brand` (strings), `price` (a number, 0 or more), `in_stock` (a boolean) and `attributes` (an
    object of name → string, number or boolean) are optional; other fields are ignored. In CSV, `price` is a
    plain decimal, `in_stock` true/false/1/0, and each `attributes.<name>` column one attribute: a cell reading
    true/false is a boolean, a plain decimal a number, anything else a string; an empty cell is absent. A row
    that breaks these rules is refused with its line number."""
    if not path.is_file():
        raise CatalogError(f"catalog {path} not found")
    csv_file = path.suffix.lower() == ".csv"
    rows = _csv_rows(path) if csv_file else _jsonl_rows(path)
    for line, row in rows:
        try:
            yield _item(row, csv_file)
        except ValueError as exc:
            raise CatalogError(f"{path}:{line}: {exc}") from None


_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def _item(row: dict, csv_file: bool) -> CatalogItem:
    item_id, title = str(row.get("id") or "").strip(), str(row.get("title") or "").strip()
    if not item_id or not title:
        raise ValueError("every item needs a non-empty 'id' and 'title'")
    strings = {name: _string(row.get(name), name, VALUE_MAX_BYTES) for name in STRING_FIELDS}
    text = _string(row.get("text"), "text", TEXT_MAX_BYTES)
    if csv_file:
        price, in_stock = _csv_number(row.get("price"), "price"), _csv_bool(row.get("in_stock"), "in_stock")
        attributes = {
            name[len(ATTRIBUTES) + 1 :]: _csv_attribute(value, name)
            for name, value in row.items()
            if isinstance(name, str) and name.startswith(ATTRIBUTES + ".") and (value or "").strip()
        }
    else:
        price, in_stock = row.get("price"), row.get("in_stock")
        if price is not None and not _is_number(price):
            raise ValueError(f"'price' must be a number, got {price!r}")
        if in_stock is not None and not isinstance(in_stock, bool):
            raise ValueError(f"'in_stock' must be true or false, got {in_stock!r}")
        attributes = row.get(ATTRIBUTES) or {}
        if not isinstance(attributes, dict):
            raise ValueError(f"'attributes' must be an object of name → string, number or boolean, got {attributes!r}")
    if price is not None and (price < 0 or price > NUMBER_MAX or not math.isfinite(price)):
        raise ValueError(f"'price' {price!r} is out of range (0 to {NUMBER_MAX:g})")
    return CatalogItem(
        item_id, title, text, price=price, in_stock=in_stock, attributes=_attributes(attributes), **strings
    )


def _string(value: object, name: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string, got {value!r}")
    value = value.strip()
    if len(value.encode("utf-8")) > limit:
        raise ValueError(f"'{name}' is {len(value.encode('utf-8'))} bytes, at most {limit}")
    return value or None


def _attributes(attributes: dict) -> dict:
    if len(attributes) > ATTRIBUTE_MAX:
        raise ValueError(f"{len(attributes)} attributes, at most {ATTRIBUTE_MAX}")
    for name, value in attributes.items():
        if not ATTRIBUTE_NAME.fullmatch(name) or len(name.encode("utf-8")) > ATTRIBUTE_NAME_MAX_BYTES:
            raise ValueError(
                f"attribute name {name[:80]!r}: 1 to {ATTRIBUTE_NAME_MAX_BYTES} bytes, no dot or control character"
            )
        if isinstance(value, str):
            if len(value.encode("utf-8")) > VALUE_MAX_BYTES:
                raise ValueError(f"attribute {name!r} is {len(value.encode('utf-8'))} bytes, at most {VALUE_MAX_BYTES}")
        elif _is_number(value):
            if abs(value) > NUMBER_MAX or not math.isfinite(value):
                raise ValueError(f"attribute {name!r}: {value!r} is out of range (at most {NUMBER_MAX:g} either sign)")
        elif not isinstance(value, bool):
            raise ValueError(f"attribute {name!r} must be a string, number or boolean, got {value!r}")
    return dict(attributes)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _csv_number(cell: str | None, name: str) -> float | int | None:
    cell = (cell or "").strip()
    if not cell:
        return None
    if not _DECIMAL.fullmatch(cell):
        raise ValueError(f"'{name}' must be a plain decimal such as 12 or 12.50, got {cell!r}")
    return float(cell) if "." in cell else int(cell)


def _csv_bool(cell: str | None, name: str) -> bool | None:
    cell = (cell or "").strip().lower()
    if not cell:
        return None
    if cell not in ("true", "false", "1", "0"):
        raise ValueError(f"'{name}' must be true, false, 1 or 0, got {cell!r}")
    return cell in ("true", "1")


def _csv_attribute(cell: str, column: str) -> str | int | float | bool:
    cell = cell.strip()
    if cell.lower() in ("true", "false"):
        return cell.lower() == "true"
    if _DECIMAL.fullmatch(cell):
        return _csv_number(cell, column)
    return cell


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CatalogError(f"{path}:{line}: not JSON ({exc.msg}); use JSONL or a .csv file") from None
            if not isinstance(row, dict):
                raise CatalogError(f"{path}:{line}: expected a JSON object with 'id' and 'title'")
            yield line, row


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            yield reader.line_num, row  # the line the row ended on (a quoted cell may span lines)


def read_manifest(index_dir: Path) -> Manifest | None:
    path = index_dir / MANIFEST
    if not path.is_file():
        return None
    fields = json.loads(path.read_text(encoding="utf-8"))
    if "data" not in fields:
        raise CatalogError(
            f"{path} names no version folder (written by an earlier ecomserve): rebuild the index with "
            "`ecomserve index build CATALOG`"
        )
    return Manifest(**fields)


def write_manifest(index_dir: Path, manifest: Manifest) -> None:
    write_text_atomically(index_dir / MANIFEST, json.dumps(asdict(manifest), indent=2) + "\n")


def read_titles(index_dir: Path, manifest: Manifest | None = None) -> dict[str, str]:
    """The titles of the version `manifest` names (default: the live one); none before the first build."""
    manifest = manifest or read_manifest(index_dir)
    if manifest is None:
        return {}
    return json.loads((version_dir(index_dir, manifest) / TITLES).read_text(encoding="utf-8"))


def write_titles(folder: Path, titles: dict[str, str]) -> None:
    """Into a version folder being staged: nothing reads it before the manifest names it, and by then it is
    on disk (synced), so a power cut cannot leave the manifest naming an empty file."""
    with (folder / TITLES).open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(titles, ensure_ascii=False))
        handle.flush()
        os.fsync(handle.fileno())


def read_items(index_dir: Path, manifest: Manifest | None = None) -> dict[str, dict]:
    """Each item's fields beyond its title (`CatalogItem.extras`) in the version `manifest` names (default: the
    live one), by id; items without any are left out. {} for indexes written before items.json."""
    manifest = manifest or read_manifest(index_dir)
    if manifest is None:
        return {}
    path = version_dir(index_dir, manifest) / ITEMS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_items(folder: Path, items: dict[str, dict]) -> None:
    """Into a version folder being staged, as `write_titles`."""
    with (folder / ITEMS).open("w", encoding="utf-8") as handle:
        handle.write(json.dumps({key: value for key, value in items.items() if value}, ensure_ascii=False))
        handle.flush()
        os.fsync(handle.fileno())
