"""The `ecomserve` command: one handler per subcommand; project errors become one line and exit 1."""

from __future__ import annotations

import json
import logging
import signal
import sys
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from ecomserve.contract import CLASSIFY, EMBED, RANK, SEARCH, SIMILAR
from ecomserve.errors import EcomserveError, ServerError, export_extra
from ecomserve.index.catalog import WRITER_WAIT_S
from ecomserve.paths import DEFAULT_SPEC_NAME, EXPORT_DIR, default_spec
from ecomserve.spec import PipelineSpec, load_spec

DEFAULT_SPEC = EXPORT_DIR / DEFAULT_SPEC_NAME
DEFAULT_REPOSITORY = Path("model_repository")

app = typer.Typer(help="Text encoders served by Triton for e-commerce search.", no_args_is_help=True)
query_app = typer.Typer(help="Call a public model on a running server and print JSON.", no_args_is_help=True)
app.add_typer(query_app, name="query")
index_app = typer.Typer(help="The catalog index behind the `search` model.", no_args_is_help=True)
app.add_typer(index_app, name="index")
console = Console(stderr=True)


def _spec_or_packaged(ctx: typer.Context, param: typer.CallbackParam, value: Path) -> Path:
    """An omitted --spec is ./export/default.yaml, or the package's copy where the working folder has none."""
    # By name: typer may carry its own copy of click, with its own ParameterSource enum.
    if getattr(ctx.get_parameter_source(param.name), "name", None) == "DEFAULT":
        return default_spec()
    return value


SpecOption = Annotated[
    Path,
    typer.Option(
        "--spec",
        callback=_spec_or_packaged,
        help="pipeline spec (YAML); without it ./export/default.yaml, or the packaged copy if there is none",
        show_default=False,
    ),
]
RepositoryOption = Annotated[Path, typer.Option("--repository", help="model repository folder")]
UrlOption = Annotated[str | None, typer.Option("--url", help="host:port (default 127.0.0.1:8000 http, :8001 grpc)")]


class ProtocolName(StrEnum):
    http = "http"
    grpc = "grpc"


ProtocolOption = Annotated[ProtocolName, typer.Option("--protocol", help="KServe v2 over HTTP or gRPC")]
# search and similar
TopKOption = Annotated[int | None, typer.Option("--top-k", help="items to return (default: search.top_k)")]
FilterOption = Annotated[
    str | None, typer.Option("--filter", help="""a JSON object over catalog fields, e.g. '{"in_stock": true}'""")
]


class TargetName(StrEnum):
    cpu = "cpu"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


def _build(spec_path: Path, repository: Path, target: TargetName | None = None) -> PipelineSpec:
    from ecomserve.repository.builder import build_repository

    spec = load_spec(spec_path, target=target.value if target else None)
    build_repository(spec, repository, spec_dir=spec_path.parent, console=console)
    console.print(f"repository written to {repository}")
    return spec


@app.command()
def build(
    spec: SpecOption = DEFAULT_SPEC,
    repository: RepositoryOption = DEFAULT_REPOSITORY,
    target: Annotated[TargetName | None, typer.Option(help="override serving.target of the spec")] = None,
) -> None:
    """Export, verify and write the model repository for a spec (and TensorRT engines where trtexec runs)."""
    built = _build(spec, repository, target)
    if built.serving.target != "tensorrt":
        return
    from ecomserve.export.tensorrt import ENGINES_FILE, build_engines, find_trtexec

    if find_trtexec() is None:
        console.print(
            f"[yellow]TensorRT engines not built:[/] trtexec is not on this machine. Plans are tied to the GPU "
            f"and TensorRT release that build them, so build them there: run `ecomserve build --target tensorrt` "
            f"inside nvcr.io/nvidia/tritonserver:24.10-py3 on the target GPU, or deploy with the Helm chart "
            f"(tensorrt.enabled=true), whose init container reads {repository / ENGINES_FILE}."
        )
        return
    build_engines(repository, console.print)


@app.command()
def serve(
    spec: SpecOption = DEFAULT_SPEC,
    repository: RepositoryOption = DEFAULT_REPOSITORY,
    host: Annotated[str, typer.Option(help="address to listen on; 0.0.0.0 exposes the server")] = "127.0.0.1",
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    api_port: Annotated[int, typer.Option(help="the HTTP API: OpenAI, Cohere/Jina and TEI schemas")] = 8080,
    api_key_file: Annotated[
        Path | None,
        typer.Option(help="file holding the inference API key (else $ECOMSERVE_API_KEY; neither: no key needed)"),
    ] = None,
    rebuild: Annotated[bool, typer.Option(help="rebuild the repository even if it exists")] = False,
) -> None:
    """Start tritonserver on the repository (building it first if missing) and block until stopped."""
    from ecomserve.contract import ADMIN_KEY_ENV
    from ecomserve.front.policy import read_api_key
    from ecomserve.repository.builder import built_target, is_built, outdated_models
    from ecomserve.server.control import ADMIN_KEY_FILE, admin_key
    from ecomserve.server.process import WORK_DIR, Ports, ServerOptions, TritonServer

    if rebuild or not is_built(repository):
        console.print(f"building {repository} from {spec} …")
        _build(spec, repository)
    elif outdated := outdated_models(repository, spec.parent):
        console.print(
            f"[yellow]{repository} was written by an older ecomserve: the configs of {', '.join(outdated)} differ "
            "from what this version writes for the same spec (newer serving settings run at their old values); "
            "rebuild with `ecomserve serve --rebuild` (published releases are replaced)[/]"
        )
    target = built_target(repository)
    if target != "cpu":
        raise ServerError(
            f"{repository} was built for target {target}, which runs in nvcr.io/nvidia/tritonserver:24.10-py3 on a "
            "GPU (the embedded server has no onnxruntime or tensorrt backend): see k8s/README.md, or rebuild "
            "with --target cpu (torch encoders run on CUDA there with serving.device: cuda)"
        )
    # The stub watchdog's restarts show on the console, beside Triton's own log file.
    # force: a build just before (logging.warning in the quantizer) may have configured the root logger.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    server = TritonServer(
        ServerOptions(
            repository=repository,
            host=host,
            ports=Ports(http_port, grpc_port, metrics_port, api_port),
            admin_key=admin_key(WORK_DIR, create=True),
            api_key=read_api_key(api_key_file),
        )
    )
    console.print("starting tritonserver …")
    try:
        server.start()
    except KeyboardInterrupt:
        server.stop()
        raise typer.Exit(130) from None
    # Ctrl-C / SIGTERM: the front and Triton finish in-flight requests before they exit.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.request_stop())
    console.print(
        f"[green]ready[/]  HTTP http://{server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}\n"
        f"API {server.api_url} (/v1/embeddings, /v1/rerank, /embed, /rerank …)"
        f"{' · API key required' if server.options.api_key else ''}\n"
        f"models: embed, rank, classify · logs: {server.log_path}, {server.front_log_path} · Ctrl-C to stop\n"
        f"model control (ecomserve publish / rollback) takes the key in {WORK_DIR / ADMIN_KEY_FILE} "
        f"or ${ADMIN_KEY_ENV}"
    )
    code = server.wait()
    if not server.stop_requested:
        raise ServerError(f"{server.failure} (tritonserver's last code {code}).\n{server.log_excerpt()}")
    console.print("tritonserver stopped")


AdminKeyOption = Annotated[
    str | None,
    typer.Option("--admin-key", help="model-control key (default: $ECOMSERVE_ADMIN_KEY, .ecomserve/admin.key)"),
]
ControlUrlOption = Annotated[str, typer.Option("--url", help="the server's HTTP host:port")]


@contextmanager
def _control(url: str, key: str | None):
    from ecomserve.server.control import ModelControl, admin_key
    from ecomserve.server.process import WORK_DIR

    control = ModelControl(url, key or admin_key(WORK_DIR))
    try:
        yield control
    finally:
        control.close()


@app.command()
def publish(
    spec: SpecOption = DEFAULT_SPEC,
    repository: RepositoryOption = DEFAULT_REPOSITORY,
    url: ControlUrlOption = "127.0.0.1:8000",
    key: AdminKeyOption = None,
) -> None:
    """Build, verify and switch a running server to a new release of the spec's encoders."""
    from ecomserve.publish import publish as publish_release

    with _control(url, key) as control:
        release = publish_release(load_spec(spec), spec.parent, repository, control, console)
    console.print(f"[green]release {release} is live[/] (ecomserve rollback returns to the previous one)")


@app.command()
def rollback(
    repository: RepositoryOption = DEFAULT_REPOSITORY,
    url: ControlUrlOption = "127.0.0.1:8000",
    key: AdminKeyOption = None,
    to: Annotated[int | None, typer.Option(help="release to serve (default: the one before the live one)")] = None,
) -> None:
    """Serve an earlier release again."""
    from ecomserve.publish import rollback as rollback_release

    with _control(url, key) as control:
        was, now = rollback_release(repository, control, to)
    console.print(f"[green]release {now} is live again[/] (was {was})")


@app.command()
def models(url: ControlUrlOption = "127.0.0.1:8000", key: AdminKeyOption = None) -> None:
    """List the server's models, versions and states (JSON)."""
    with _control(url, key) as control:
        print(json.dumps(control.index(), indent=2))


CatalogArgument = Annotated[
    Path,
    typer.Argument(
        help="JSONL or CSV with `id` and `title` per item, optionally text, category, brand, price, in_stock and "
        "attributes (CSV: attributes.<name> columns); see the README's catalog format"
    ),
]
WaitOption = Annotated[
    float, typer.Option("--wait", min=0, help="seconds to wait for another index writer (a build) to finish")
]


def _index_target(spec: PipelineSpec, repository: Path) -> Path:
    from ecomserve.index.ops import index_dir

    # Relative index folders sit beside the repository, where the search model looks for them.
    return index_dir(spec, repository.resolve().parent)


def _write_index(operation, catalog: Path, spec_path: Path, repository: Path, wait: float):
    """Run a catalog operation (build, upsert) with the spec and the index folder it names."""
    from ecomserve.index.catalog import read_catalog

    spec = load_spec(spec_path)
    target = _index_target(spec, repository)
    return operation(spec, repository, list(read_catalog(catalog)), target, console, wait_s=wait), target


@index_app.command("build")
def index_build(
    catalog: CatalogArgument,
    spec: SpecOption = DEFAULT_SPEC,
    repository: RepositoryOption = DEFAULT_REPOSITORY,
    wait: WaitOption = WRITER_WAIT_S,
) -> None:
    """Embed every catalog item with the live release and commit the new index (resumable)."""
    from ecomserve.index.ops import build_index

    manifest, target = _write_index(build_index, catalog, spec, repository, wait)
    console.print(
        f"[green]index version {manifest.version}[/]: {manifest.items} items, release {manifest.release}, {target}"
    )


@index_app.command("upsert")
def index_upsert(
    catalog: CatalogArgument,
    spec: SpecOption = DEFAULT_SPEC,
    repository: RepositoryOption = DEFAULT_REPOSITORY,
    wait: WaitOption = WRITER_WAIT_S,
) -> None:
    """Add or replace items; `search` sees them at its next request."""
    from ecomserve.index.ops import upsert_items

    manifest, _ = _write_index(upsert_items, catalog, spec, repository, wait)
    console.print(f"[green]index version {manifest.version}[/]: {manifest.items} items")


@index_app.command("delete")
def index_delete(
    ids: Annotated[list[str], typer.Argument(help="item ids to remove")],
    spec: SpecOption = DEFAULT_SPEC,
    repository: RepositoryOption = DEFAULT_REPOSITORY,
    wait: WaitOption = WRITER_WAIT_S,
) -> None:
    """Remove items by id; `search` stops returning them at its next request."""
    from ecomserve.index.ops import delete_items

    loaded = load_spec(spec)
    manifest, removed = delete_items(loaded, ids, _index_target(loaded, repository), wait_s=wait)
    console.print(f"[green]index version {manifest.version}[/]: removed {removed}, {manifest.items} items")


class WorkloadName(StrEnum):
    serving = "serving"
    search = "search"
    front = "front"
    peers = "peers"
    latency = "latency"


@app.command()
def bench(
    spec: SpecOption = DEFAULT_SPEC,
    out: Annotated[Path, typer.Option(help="folder for results.json, CSV, PNG plots, summary.md")] = Path(
        "bench_results"
    ),
    duration: Annotated[float, typer.Option(help="seconds per measured point")] = 5.0,
    concurrency: Annotated[list[int] | None, typer.Option(help="client counts for the served runs")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="compression variants to build and measure")] = None,
    tune: Annotated[bool, typer.Option(help="also compare layouts, instances × threads, batching delay")] = True,
    workload: Annotated[
        WorkloadName,
        typer.Option(
            help="serving: the encoders and server; search: the catalog index backends; "
            "front: the front process against straight-to-Triton calls; latency: where one query's time goes, "
            "per serving setting; peers: only the embed workloads, served and in-process, against each --peer"
        ),
    ] = WorkloadName.serving,
    scales: Annotated[
        list[int] | None, typer.Option(help="search: catalog sizes, repeat for each (default 10000, 100000)")
    ] = None,
    soak: Annotated[
        float, typer.Option(help="latency: seconds of fresh texts with the response cache on, for the server's RSS")
    ] = 120.0,
    peer: Annotated[
        list[str] | None,
        typer.Option(
            help="KIND=VENV, repeat for each: measure a peer (infinity, fastembed) from its own venv in the same "
            "run (scripts/setup_peers.sh creates them)"
        ),
    ] = None,
) -> None:
    """PyTorch, the in-process runtime, every compression variant and the served pipeline, in one run
    (--workload search: faiss exact / HNSW and Milvus Lite on synthetic catalogs; --peer: Infinity and
    fastembed beside them, --workload peers: only that comparison)."""
    if peer and workload not in (WorkloadName.serving, WorkloadName.peers):
        raise typer.BadParameter("peers are measured with --workload serving or peers", param_hint="--peer")
    if workload == WorkloadName.peers and not peer:
        raise typer.BadParameter("--workload peers needs at least one --peer KIND=VENV", param_hint="--peer")
    if workload == WorkloadName.front:
        from ecomserve.bench.front import bench_front, front_markdown

        found = bench_front(load_spec(spec), spec.parent, out, duration, console)
        console.print(front_markdown(found), highlight=False, soft_wrap=True)
        return
    if workload == WorkloadName.latency:
        from ecomserve.bench.latency import latency_markdown, run_latency_bench

        found = run_latency_bench(
            load_spec(spec), spec.parent, out, duration, console, Path(".ecomserve/bench"), soak_s=soak
        )
        console.print(latency_markdown(found), highlight=False, soft_wrap=True)
        return
    if workload == WorkloadName.search:
        from ecomserve.bench.search import MAX_SCALE, bench_search
        from ecomserve.bench.search_report import search_markdown

        if any(not 100 <= scale <= MAX_SCALE for scale in scales or []):
            raise typer.BadParameter(f"each scale must be between 100 and {MAX_SCALE}", param_hint="--scales")
        found = bench_search(load_spec(spec), spec.parent, out, duration, scales, console)
        console.print(search_markdown(found), highlight=False, soft_wrap=True)
        return
    with export_extra("ecomserve bench (PyTorch is its baseline)", alternative=""):
        from ecomserve.bench.peers import PeerError, parse_peers
        from ecomserve.bench.report import format_check
        from ecomserve.bench.run import BenchOptions, run_bench
        from ecomserve.bench.variants import VARIANTS

    unknown = sorted(set(variant or []) - set(VARIANTS))
    if unknown:
        raise typer.BadParameter(f"unknown variants {unknown}; known: {list(VARIANTS)}", param_hint="--variant")
    try:
        peers = parse_peers(peer or [])
    except PeerError as error:
        raise typer.BadParameter(str(error), param_hint="--peer") from None
    options = BenchOptions(
        spec=load_spec(spec),
        spec_dir=spec.parent,
        out_dir=out,
        duration_s=duration,
        tune=tune,
        peers=peers,
        peers_only=workload == WorkloadName.peers,
    )
    if concurrency:
        options.concurrency = concurrency
    if variant:
        options.variants = variant
    results = run_bench(options, console)
    console.print((out / "summary.md").read_text(), highlight=False)
    for check, value in results["checks"].items():
        console.print(f"{check}: {format_check(value)}")


def _client(url: str | None, protocol: ProtocolName):
    from ecomserve.client import EcomClient

    return EcomClient(url, protocol.value)


def _print(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")


@query_app.command("embed")
def query_embed(texts: list[str], url: UrlOption = None, protocol: ProtocolOption = ProtocolName.http) -> None:
    """Fused, L2-normalised embeddings of TEXTS."""
    with _client(url, protocol) as client:
        embeddings = client.embed(texts)
    _print({"model": EMBED, "embeddings": embeddings.tolist()})


@query_app.command("rank")
def query_rank(
    query: str, candidates: list[str], url: UrlOption = None, protocol: ProtocolOption = ProtocolName.http
) -> None:
    """Score CANDIDATES against QUERY; `order` lists candidate indices best first."""
    with _client(url, protocol) as client:
        result = client.rank(query, candidates)
    _print(
        {
            "model": RANK,
            "scores": result.scores.tolist(),
            "encoder_scores": result.encoder_scores.tolist(),
            "order": result.order(),
        }
    )


@query_app.command("search")
def query_search(
    query: str,
    top_k: TopKOption = None,
    filter_json: FilterOption = None,
    mode: Annotated[
        str | None, typer.Option("--mode", help="hybrid | dense | lexical (default: the spec's search.mode)")
    ] = None,
    url: UrlOption = None,
    protocol: ProtocolOption = ProtocolName.http,
) -> None:
    """Catalog items for QUERY from the index, best first (only those FILTER matches, with --filter)."""
    with _client(url, protocol) as client:
        result = client.search(query, top_k, filter=filter_json, mode=mode)
    _print({"model": SEARCH, "ids": result.ids, "scores": result.scores.tolist()})


@query_app.command("similar")
def query_similar(
    ids: Annotated[list[str], typer.Argument(help="item ids: one item, or a shopper's recent items, most recent last")],
    top_k: TopKOption = None,
    filter_json: FilterOption = None,
    diversity: Annotated[
        float | None,
        typer.Option("--diversity", help="0 (by similarity only) to 1 (MMR; default: the spec's search.diversity)"),
    ] = None,
    url: UrlOption = None,
    protocol: ProtocolOption = ProtocolName.http,
) -> None:
    """Catalog items similar to IDS from the index, best first, never one of IDS (only those FILTER matches)."""
    with _client(url, protocol) as client:
        result = client.similar(ids, top_k, filter=filter_json, diversity=diversity)
    _print({"model": SIMILAR, "ids": result.ids, "scores": result.scores.tolist()})


@query_app.command("classify")
def query_classify(
    text: str,
    labels: Annotated[list[str], typer.Option("--label", help="a candidate label; repeat for each")],
    url: UrlOption = None,
    protocol: ProtocolOption = ProtocolName.http,
) -> None:
    """Pick the label the encoders vote for."""
    with _client(url, protocol) as client:
        result = client.classify(text, labels)
    _print({"model": CLASSIFY, "label": result.label, "votes": result.votes.tolist(), "scores": result.scores.tolist()})


def run(argv: list[str] | None = None) -> None:
    """Run the CLI; raises project exceptions instead of exiting, for tests and embedding."""
    app(args=argv, standalone_mode=False)


def main() -> None:
    # Standalone mode: usage errors print usage and exit 2; our own errors print one line and exit 1.
    try:
        app()
    except EcomserveError as exc:
        # soft_wrap: an error stays one line whatever the terminal width (scripts read it).
        console.print("[red]error:[/]", escape(str(exc)), highlight=False, soft_wrap=True)
        sys.exit(1)
