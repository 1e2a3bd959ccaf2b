"""Opening a catalog index: the backend a spec names (`open_index`), the version a manifest names
(`open_version`), the live version whole (`load_index`), as the `search` model reads it, and the live version
kept current (`LiveIndex`), as the `similar` model holds it.

The search and similar models import this and not `ops.py`, which embeds (and so pulls in the repository
builder, rich and tritonclient): keep it that way (tests/test_architecture.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ecomserve.index.catalog import CatalogError, Manifest, read_items, read_manifest, read_titles, version_dir
from ecomserve.index.faiss_index import FaissIndex
from ecomserve.index.lexical import LexicalIndex, LexicalRetriever
from ecomserve.index.milvus_index import MilvusIndex, MilvusLexical
from ecomserve.index.vector_index import VectorIndex
from ecomserve.spec import SearchSpec

LOAD_ATTEMPTS = 5


def open_index(spec: SearchSpec, directory: Path, dim: int, relative_to: Path | None = None) -> VectorIndex:
    """The index of `spec.backend`. faiss: loaded from `directory` if saved there, else empty (save() writes
    it there). milvus: connected, the collection created if missing; a relative `.db` uri or token file is
    taken from `relative_to` (default: the parent of `directory`), so the CLI and the search model find the
    same file from any working dir."""
    if spec.backend == "faiss":
        return FaissIndex.open(directory, dim, spec.faiss)
    return MilvusIndex(spec.milvus, dim, relative_to=relative_to or Path(directory).parent)


def backend_spec(search: SearchSpec, release: int) -> SearchSpec:
    """Each release gets its own Milvus collection, so a rebuild never overwrites the one being searched."""
    milvus = search.milvus.model_copy(update={"collection": f"{search.milvus.collection}_r{release}"})
    return search.model_copy(update={"milvus": milvus})


def open_version(search: SearchSpec, folder: Path, manifest: Manifest) -> VectorIndex:
    """The index of the version `manifest` names in `folder`; a relative Milvus Lite file or token file is
    taken beside the index folder, wherever the version lies."""
    spec = backend_spec(search, manifest.release)
    return open_index(spec, version_dir(folder, manifest), manifest.dim, relative_to=folder.parent)


def load_index(search: SearchSpec, target: Path) -> tuple[Manifest, VectorIndex, dict[str, str]] | None:
    """The live version of `target`, everything from the one folder its manifest names (None before the first
    build). Writers keep the version before theirs, so only two commits during one load remove the folder
    being read; then the load starts again from the newer manifest."""
    return _load_live(target, lambda manifest: (manifest, *_dense(search, target, manifest)))


def load_search_index(
    search: SearchSpec, target: Path
) -> tuple[Manifest, VectorIndex, dict[str, str], LexicalRetriever | None] | None:
    """`load_index` and the version's BM25 retriever, as the `search` model reads them: the version folder's BM25
    files (None in versions written before lexical search), or Milvus's own BM25 in the same collection."""

    def read(manifest: Manifest):
        index, titles = _dense(search, target, manifest)
        if isinstance(index, MilvusIndex) and index.has_lexical:
            return manifest, index, titles, MilvusLexical(index)
        return manifest, index, titles, LexicalIndex.load(version_dir(target, manifest), read_items(target, manifest))

    return _load_live(target, read)


def _dense(search: SearchSpec, target: Path, manifest: Manifest) -> tuple[VectorIndex, dict[str, str]]:
    return open_version(search, target, manifest), read_titles(target, manifest)


def _load_live(target: Path, read: Callable[[Manifest], tuple]) -> tuple | None:
    for _attempt in range(LOAD_ATTEMPTS):
        manifest = read_manifest(target)
        if manifest is None:
            return None
        folder = version_dir(target, manifest)
        try:
            loaded = read(manifest)
        except Exception:  # noqa: BLE001 - whatever a half-removed folder raises (faiss, json, a missing file)
            if folder.is_dir():
                raise
            continue
        if folder.is_dir():  # writers rename a version before removing it: still here means read whole
            return loaded
    raise CatalogError(f"{target} changed {LOAD_ATTEMPTS} times while it was being read: is a writer looping?")


# How stale a serving model's index may be: well inside the 5 s the catalog promises.
MANIFEST_CHECK_S = 0.25


class LiveIndex:
    """The live version of a catalog index as a serving model holds it (the `similar` model; `search` keeps the
    same logic inline): the manifest is looked at again at most every `check_s` seconds, and when it names
    another version that version is loaded whole (`load_index`), so every answer comes from one version."""

    def __init__(self, search: SearchSpec, target: Path, check_s: float = MANIFEST_CHECK_S) -> None:
        self.search, self.target, self.check_s = search, target, check_s
        self.manifest: Manifest | None = None
        self.index: VectorIndex | None = None
        self.titles: dict[str, str] = {}
        self._checked_at = 0.0

    def refresh(self) -> bool:
        """Look at the manifest if it is time to; True when another version was loaded. Afterwards `index` is
        None only while there is no index at all (before the first build)."""
        now = time.monotonic()
        if self.index is not None and now - self._checked_at < self.check_s:
            return False
        self._checked_at = now
        manifest = read_manifest(self.target)
        if manifest is not None and manifest == self.manifest:
            return False
        loaded = load_index(self.search, self.target)
        if loaded is None:
            self.manifest, self.index, self.titles = None, None, {}
            return False
        self.manifest, self.index, self.titles = loaded
        return True
