"""The Milvus token never reaches a model config: the spec names an environment variable or a file, a
literal token is refused, the repository holds only the reference, and a running server's
/v2/models/search/config (HTTP and gRPC) shows no token while `search` still connects with it."""

from __future__ import annotations

import json

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from rich.console import Console
from support import client_for, make_tiny_bert, spec_from, start_server

from ecomserve.errors import SpecError
from ecomserve.index.catalog import CatalogItem
from ecomserve.index.milvus_index import milvus_token
from ecomserve.index.milvus_lite import start_milvus_lite
from ecomserve.index.ops import build_index, index_dir
from ecomserve.index.vector_index import VectorIndexError
from ecomserve.repository.builder import build_repository
from ecomserve.spec import MilvusSpec

SECRET = "root:do-not-leak-7f3a9c"


def milvus_pipeline(source, milvus: dict) -> dict:
    return {
        "encoders": [{"name": "tiny", "source": str(source), "max_seq_len": 32}],
        "search": {"backend": "milvus", "milvus": milvus},
    }


def test_a_literal_token_is_refused_without_echoing_it():
    with pytest.raises(SpecError) as refused:
        spec_from(milvus_pipeline("unused", {"uri": "http://milvus:19530", "token": SECRET}))
    message = str(refused.value)
    assert "search.milvus" in message and "token_env" in message and "token_file" in message
    assert SECRET not in message
    with pytest.raises(SpecError, match="token_env or token_file, not both"):
        spec_from(milvus_pipeline("unused", {"token_env": "MILVUS_TOKEN", "token_file": "/run/secrets/t"}))


def test_the_token_is_read_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ECOMSERVE_TEST_MILVUS_TOKEN", SECRET)
    assert milvus_token(MilvusSpec(token_env="ECOMSERVE_TEST_MILVUS_TOKEN")) == SECRET
    monkeypatch.delenv("ECOMSERVE_TEST_MILVUS_TOKEN")
    with pytest.raises(VectorIndexError, match="ECOMSERVE_TEST_MILVUS_TOKEN is not set.*tritonserver's environment"):
        milvus_token(MilvusSpec(token_env="ECOMSERVE_TEST_MILVUS_TOKEN"))

    (tmp_path / "milvus-token").write_text(SECRET + "\n")  # as a Kubernetes Secret file often ends
    assert milvus_token(MilvusSpec(token_file=str(tmp_path / "milvus-token"))) == SECRET
    assert milvus_token(MilvusSpec(token_file="milvus-token"), relative_to=tmp_path) == SECRET
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(VectorIndexError, match="empty: write the Milvus token"):
        milvus_token(MilvusSpec(token_file=str(tmp_path / "empty")))
    with pytest.raises(VectorIndexError, match="cannot read it .*: mount or create it"):
        milvus_token(MilvusSpec(token_file=str(tmp_path / "missing")))
    assert milvus_token(MilvusSpec()) == ""  # Milvus Lite, or a server without authentication


def files_containing(root, text: str) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


@pytest.mark.parametrize("where", ["token_env", "token_file"])
def test_the_repository_holds_only_the_reference(tmp_path, monkeypatch, where):
    monkeypatch.setenv("MILVUS_TOKEN", SECRET)
    (tmp_path / "milvus-token").write_text(SECRET)
    reference = "MILVUS_TOKEN" if where == "token_env" else str(tmp_path / "milvus-token")
    spec = spec_from(milvus_pipeline(make_tiny_bert(tmp_path / "tiny", seed=9), {where: reference}))
    repository = tmp_path / "model_repository"
    build_repository(spec, repository, console=Console(quiet=True))

    assert files_containing(repository, SECRET) == []
    config = (repository / "search" / "config.pbtxt").read_text()
    assert f'\\"{where}\\": \\"{reference}\\"' in config  # the search parameter is JSON inside the pbtxt


@pytest.mark.integration
def test_the_served_config_shows_no_token_and_search_connects_with_it(tmp_path, monkeypatch):
    # tritonserver inherits this process's environment, and its python stubs inherit tritonserver's.
    monkeypatch.setenv("MILVUS_TOKEN", SECRET)
    with start_milvus_lite(tmp_path / "catalog.db") as milvus:
        spec = spec_from(
            milvus_pipeline(make_tiny_bert(tmp_path / "tiny", seed=9), {"uri": milvus.uri, "token_env": "MILVUS_TOKEN"})
        )
        server = start_server(spec, tmp_path)
        try:
            repository = server.options.repository
            item = CatalogItem("sku-1", "zebra print velvet armchair")
            build_index(spec, repository, [item], index_dir(spec, repository.parent), Console(quiet=True))
            with client_for(server, "http") as client:
                assert client.search(item.title, top_k=1).ids == [item.id]

            over_http = httpclient.InferenceServerClient(server.http_url).get_model_config("search")
            over_grpc = grpcclient.InferenceServerClient(server.grpc_url).get_model_config("search", as_json=True)
            for config in (over_http, over_grpc):
                text = json.dumps(config)
                assert SECRET not in text and "MILVUS_TOKEN" in text
            assert files_containing(tmp_path, SECRET) == []
        finally:
            server.stop()
