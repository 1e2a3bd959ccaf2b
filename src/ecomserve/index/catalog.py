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
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ecomserve.errors import EcomserveError
from ecomserve.files import write_text_atomically

MANIFEST = "index.json"
TITLES = "titles.json"
WRITER_WAIT_S = 30.0  # how long an index writer waits for another one (a build) to finish


class CatalogError(EcomserveError):
    """A catalog file or index folder the user has to fix."""


@dataclass(frozen=True)
class CatalogItem:
    id: str
    title: str


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
    """Items from JSONL (one object per line) or CSV (header row); `id` and `title` are required,
    other fields (category, price …) are ignored by the index."""
    if not path.is_file():
        raise CatalogError(f"catalog {path} not found")
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    for line, row in rows:
        item_id, title = str(row.get("id") or "").strip(), str(row.get("title") or "").strip()
        if not item_id or not title:
            raise CatalogError(f"{path}:{line}: every item needs a non-empty 'id' and 'title'")
        yield CatalogItem(item_id, title)


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
        yield from enumerate(csv.DictReader(handle), start=2)


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
