"""The run around the users: ecomserve's command-line options, the load shape, and the listeners that set the
traffic mix when the run starts and apply the SLO gate and draw the plot when it ends.

Every option also reads an environment variable (LOCUST_<NAME>), so Kubernetes and CI can set them; custom
options reach the workers of a distributed run from the master."""

import locust  # noqa: F401  first: gevent monkey-patches the standard library before anything else imports it

# isort: split
import logging
import re
from pathlib import Path

import locust.stats
import report
import stages
from api_requests import API_KEY_ENV, ENCODING_FORMATS
from api_users import DEFAULT_API_URL
from locust import LoadTestShape, events
from locust.runners import WorkerRunner
from slo import Slo, Totals, describe, violations
from triton_users import REQUEST_TIMEOUT_S
from workload import CATALOG_SCENARIOS, DATA_DIR, SCENARIOS, SEARCH_MODES, WorkloadSettings, parse_search_modes

logger = logging.getLogger("loadtest")

SLO_FAILED_EXIT_CODE = 3  # the gate's verdict; Locust's own problems keep their codes (1, 2)
REPORT_FAILED_EXIT_CODE = 1
# The default traffic mix: retrieval embeds every query, most searches re-rank, fewer pages recommend,
# and new listings are categorised now and then. The catalog scenarios (the search and similar models) need the
# server's index built from --data-dir's catalog, so they run only when given a weight.
DEFAULT_WEIGHTS = {
    "search": 3,
    "query_embedding": 4,
    "recommendation": 2,
    "category": 1,
    "catalog_search": 0,
    "similar": 0,
}
PROTOCOLS = ("http", "grpc", "api")  # Triton's KServe v2 over HTTP and gRPC; ecomserve's OpenAI/Cohere HTTP API
DEFAULT_PROTOCOLS = ("http", "grpc")


def _option(group, flag: str, **kwargs) -> None:
    """An option that also reads LOCUST_<FLAG> (--stage-s: LOCUST_STAGE_S), like Locust's own."""
    group.add_argument(flag, env_var="LOCUST_" + flag.lstrip("-").replace("-", "_").upper(), **kwargs)


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    defaults = WorkloadSettings()
    workload = parser.add_argument_group("ecomserve workload")
    _option(
        workload,
        "--grpc-host",
        default="127.0.0.1:8001",
        help="gRPC endpoint host:port of the gRPC users (--host is the HTTP users' endpoint)",
    )
    _option(
        workload,
        "--api-url",
        default=DEFAULT_API_URL,
        help=f"base URL of ecomserve's HTTP API (`ecomserve serve --api-port`) for the api users "
        f"(every user sends the server's API key from ${API_KEY_ENV}, never from an option)",
    )
    _option(
        workload,
        "--api-model",
        default="",
        help="model id the api users send (default: the first id GET /v1/models lists)",
    )
    _option(
        workload,
        "--api-encoding-format",
        choices=ENCODING_FORMATS,
        default="float",
        help="encoding_format of the api users' /v1/embeddings requests",
    )
    _option(
        workload,
        "--protocols",
        default=",".join(DEFAULT_PROTOCOLS),
        help="comma-separated protocols to run users for: http, grpc, api (ecomserve's HTTP API on --api-url)",
    )
    for scenario, weight in DEFAULT_WEIGHTS.items():
        needs = (
            " (needs the server's index built from --data-dir's catalog.csv)" if scenario in CATALOG_SCENARIOS else ""
        )
        _option(
            workload,
            f"--weight-{scenario.replace('_', '-')}",
            type=int,
            default=weight,
            help=f"share of users running the {scenario} scenario; 0 leaves it out{needs}",
        )
    _option(
        workload,
        "--candidates",
        type=int,
        default=defaults.candidates,
        help="rank: catalog titles per search request (N)",
    )
    _option(
        workload,
        "--recommend-items",
        type=int,
        default=defaults.recommend_items,
        help="embed: titles per recommendation request",
    )
    _option(
        workload,
        "--top-k",
        type=int,
        default=defaults.top_k,
        help="search, similar: TOP_K of every request (at most the server's search.max_top_k)",
    )
    _option(
        workload,
        "--search-modes",
        default=defaults.search_modes,
        help=f"catalog_search: the MODE mix, comma-separated mode:weight ({', '.join(SEARCH_MODES)}); each mode "
        f"(and each with a FILTER) is its own request name",
    )
    _option(
        workload,
        "--filter-share",
        type=float,
        default=defaults.filter_share,
        help="catalog_search, similar: share of the requests that carry a FILTER (one of the catalog's; 0 to 1)",
    )
    _option(
        workload,
        "--unique-texts",
        action="store_true",
        default=False,
        help="append a random number to every query and title so embed's response cache misses",
    )
    _option(
        workload,
        "--think-time-ms",
        type=float,
        default=0.0,
        help="pause of each user between its requests (0: back to back, a closed loop)",
    )
    _option(
        workload,
        "--data-dir",
        default=str(DATA_DIR),
        help="folder with catalog.csv (id,category,title[,brand,price,in_stock]) and queries.txt",
    )

    shape = parser.add_argument_group("load shape (with --shape, -u is the peak user count and -t a cap)")
    _option(
        shape,
        "--shape",
        choices=("none", *stages.SHAPES),
        default="none",
        help="step: 1, 2, 4 … -u users; spike: -u/8, then -u, then -u/8; soak: ramp to -u and hold. "
        "Without it, -u/-r/-t run as usual",
    )
    _option(shape, "--stage-s", type=float, default=15.0, help="seconds per stage (the soak's ramp)")
    _option(shape, "--soak-s", type=float, default=600.0, help="soak: seconds to hold the peak after the ramp")

    gate = parser.add_argument_group("SLO gate (checked when the run ends; exit code 3 when broken)")
    _option(
        gate,
        "--slo-p95-ms",
        type=float,
        default=0.0,
        help="largest p95 response time over all requests, ms (0: no limit)",
    )
    _option(
        gate,
        "--slo-p99-ms",
        type=float,
        default=0.0,
        help="largest p99 response time over all requests, ms (0: no limit)",
    )
    _option(
        gate,
        "--slo-fail-ratio",
        type=float,
        default=0.0,
        help="largest failures/requests (default 0: any failed request or wrong answer fails the run)",
    )
    _option(
        gate,
        "--plot",
        default="",
        help=f"PNG of throughput and latency against users (default with --csv: PREFIX{report.PLOT_SUFFIX})",
    )


class ScenarioShape(LoadTestShape):
    """--shape step|spike|soak: walks stages.build(…); without --shape the init listener removes it."""

    use_common_options = True  # it reads -u (peak users) and -t (a cap)

    def __init__(self):
        super().__init__()
        self.stages: list[stages.Stage] | None = None

    def tick(self):
        options = self.runner.environment.parsed_options
        if self.stages is None:
            self.stages = shape_stages(options)
        elapsed = self.get_run_time()
        stage = stages.stage_at(self.stages, elapsed)
        if stage is None or (options.run_time and elapsed >= options.run_time):
            return None
        return stage.users, stage.spawn_rate


def shape_stages(options) -> list[stages.Stage]:
    return stages.build(options.shape, options.num_users or 1, options.stage_s, options.soak_s)


@events.init.add_listener
def configure_run(environment, runner, **_kwargs) -> None:
    """On the master (or a standalone run): the traffic mix, the shape, and checked options. Workers spawn what the
    master tells them, with the master's option values."""
    options = environment.parsed_options
    if options is None or isinstance(runner, WorkerRunner):
        return
    try:
        _check_options(options)
        _select_users(environment, options)
    except ValueError as exc:
        raise SystemExit(f"loadtest: {exc}") from None
    if not environment.stop_timeout:
        # Users that stop (at -t, or when a shape steps down) finish the request in flight first: a user killed
        # mid-request goes unreported, and tritonserver 2.51 has crashed on gRPC calls cancelled that way.
        environment.stop_timeout = REQUEST_TIMEOUT_S
    if options.shape == "none":
        environment.shape_class = None  # plain -u/-r/-t
    else:
        plan = ", ".join(f"{s.users} users until {s.until_s:g} s" for s in shape_stages(options))
        logger.info(f"--shape {options.shape}: {plan}")
    if options.csv_prefix:
        # The plot is drawn from the history file when the run ends: keep what is on disk at most ~1 s old.
        locust.stats.CSV_STATS_FLUSH_INTERVAL_SEC = 1


def _check_options(options) -> None:
    if options.candidates < 1 or options.recommend_items < 1 or options.top_k < 1:
        raise ValueError("--candidates, --recommend-items and --top-k must be at least 1")
    parse_search_modes(options.search_modes)  # raises ValueError naming what is wrong
    if not 0 <= options.filter_share <= 1:
        raise ValueError(f"--filter-share {options.filter_share:g}: expected a share from 0 to 1")
    if options.think_time_ms < 0:
        raise ValueError("--think-time-ms must not be negative")
    if not re.fullmatch(r"https?://[^/?#\s]+/?", options.api_url):
        raise ValueError(f"--api-url {options.api_url!r}: expected a base URL, http://host:port")
    if options.plot and not options.csv_prefix:
        raise ValueError("--plot draws from the stats history: add --csv PREFIX")
    if options.shape != "none":
        shape_stages(options)  # raises ValueError on a bad -u/--stage-s/--soak-s


def _select_users(environment, options) -> None:
    """Weights from --weight-*, classes of the --protocols only; 0 weight leaves a class out, unless the class is
    named on the command line (the catalog scenarios' weights are 0 by default)."""
    protocols = {p.strip() for p in options.protocols.split(",") if p.strip()}
    if not protocols or not protocols <= set(PROTOCOLS):
        raise ValueError(f"--protocols {options.protocols!r}: expected a comma-separated subset of {PROTOCOLS}")
    named = set(getattr(options, "user_classes", None) or ())
    for user_class in environment.user_classes:
        scenario = getattr(user_class, "scenario", None)
        if scenario in SCENARIOS:
            weight = getattr(options, f"weight_{scenario}")
            user_class.weight = max(weight, 1) if user_class.__name__ in named else weight
    selected = [
        u for u in environment.user_classes if getattr(u, "protocol", None) in protocols | {None} and u.weight > 0
    ]
    if not selected:
        raise ValueError(
            "no user class left to run: check --protocols (the api users need api in it) and the --weight-* options"
        )
    environment.user_classes = selected
    logger.info("users: " + ", ".join(f"{u.__name__} (weight {u.weight})" for u in selected))


@events.quitting.add_listener
def gate_and_report(environment, **_kwargs) -> None:
    """On the master (or a standalone run), with the totals of all workers: the SLO verdict and the plot."""
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, WorkerRunner):
        return
    total = environment.stats.total
    totals = Totals(
        requests=total.num_requests,
        failures=total.num_failures,
        p95_ms=total.get_response_time_percentile(0.95) or 0,
        p99_ms=total.get_response_time_percentile(0.99) or 0,
        exceptions=sum(error["count"] for error in environment.runner.exceptions.values()),
    )
    slo = Slo(p95_ms=options.slo_p95_ms, p99_ms=options.slo_p99_ms, fail_ratio=options.slo_fail_ratio)
    problems = violations(slo, totals)
    if problems:
        logger.error(f"SLO gate FAILED: {'; '.join(problems)} — {describe(slo, totals)}")
    else:
        logger.info(f"SLO gate passed: {describe(slo, totals)}")
    report_failed = bool(options.csv_prefix) and not _write_plot(options, _run_title(environment))
    if problems:
        environment.process_exit_code = SLO_FAILED_EXIT_CODE
    else:
        environment.process_exit_code = REPORT_FAILED_EXIT_CODE if report_failed else 0


def _run_title(environment) -> str:
    options, classes = environment.parsed_options, [u.__name__ for u in environment.user_classes]
    users = ", ".join(classes) if len(classes) <= 3 else f"{len(classes)} user classes ({options.protocols})"
    return f"{options.shape} shape: {users}" if options.shape != "none" else users


def _write_plot(options, title: str) -> bool:
    history = Path(f"{options.csv_prefix}{report.HISTORY_SUFFIX}")
    png = Path(options.plot) if options.plot else report.plot_path_for(options.csv_prefix)
    try:
        points = report.write_report(history, png, title)
    except (report.ReportError, OSError) as exc:
        logger.error(f"no plot: {exc}")
        return False
    logger.info(f"plot: {png}\n{report.format_levels(points)}")
    return True
