#!/usr/bin/env python3
"""Model reload Job: every ready Triton pod behind the headless Service loads the repository's release.

With --model-control-mode=explicit, a load request for a model that is already loaded makes Triton
read the repository again, load what is there now beside the serving version, and switch once it is
ready; if the load fails, the serving version stays. `ecomserve publish` (or `rollback`) rewrites the
configs for a release through one pod; this Job brings every pod onto it: the versioned models first
(they load the release's versions beside the older ones), `embed` last (its config pins the release of
every step, so traffic moves in one step), then it waits until `embed` is ready on the pod. `rank`,
`classify` and `search` follow `embed` (search: the release its index names); they are not reloaded.
Pods are done one after another, so at most one pod at a time loads a release. Any failure makes the
Job (and `helm upgrade`) fail.

Every model-repository call carries the header ecomserve-admin-key (the pod's front process refuses
them without it); with an inference API key (the chart's apiKey), every call also carries
`Authorization: Bearer <key>`. Both keys are read from files (mounted Secrets), never from the
environment; a key file that is missing, unreadable or empty stops the Job before any call. Neither key
is ever printed.

Environment: TRITON_SERVICE (headless Service DNS name), TRITON_HTTP_PORT, RELOAD_MODELS (comma
separated, in order; empty: every model in the repository index but rank, classify and search, embed last),
LOAD_TIMEOUT_S (per load, and for embed to be ready), ECOMSERVE_ADMIN_KEY_FILE (the file holding the
admin key, a mounted Secret; required), ECOMSERVE_API_KEY_FILE (the file holding the inference API key,
a mounted Secret; unset: no key). ECOMSERVE_ADMIN_KEY is not read.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# The header, the release order and the unversioned models come from ecomserve.contract (this Job runs
# without ecomserve installed): EMBED is loaded after every other model, its config names the release of
# each step; the UNVERSIONED python heads follow `embed` and are not reloaded. The same rule as
# `ecomserve publish` (ecomserve.publish.switch), except that the repository is already switched when
# this Job runs: the pod that published wrote the configs, so here a load reads the final configs.
# --- begin generated from ecomserve.contract (python -m ecomserve.contract --write FILE); do not edit ---
ADMIN_HEADER = "ecomserve-admin-key"
EMBED = "embed"
UNVERSIONED = ("classify", "rank", "search", "similar")


def load_order(names: list[str]) -> list[str]:
    """The versioned models among `names` in the order a release switch loads them: each once, the
    others in the given order, `embed` last (its config pins the release of every step)."""
    unique = [name for name in dict.fromkeys(names) if name not in UNVERSIONED]
    return [name for name in unique if name != EMBED] + [name for name in unique if name == EMBED]


# --- end generated from ecomserve.contract ---
POLL_S = 1.0


def pod_addresses(service: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(service, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {service}: {exc} (no ready pods?)") from None
    return sorted({info[4][0] for info in infos})


def post(url: str, timeout_s: float, key: str) -> bytes:
    headers = {"Content-Type": "application/json", ADMIN_HEADER: key}
    request = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read()


def repository_models(base: str, key: str) -> list[str]:
    index = json.loads(post(f"{base}/v2/repository/index", 30, key))
    return load_order([entry["name"] for entry in index])


def wait_ready(base: str, model: str, timeout_s: float) -> str | None:
    """None once GET /v2/models/<model>/ready answers 200, else why not after timeout_s."""
    url = f"{base}/v2/models/{urllib.parse.quote(model, safe='')}/ready"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                if response.status == 200:
                    return None
                last = f"HTTP {response.status}"
        except OSError as exc:
            last = reason(exc)
        if time.monotonic() >= deadline:
            return f"not ready after {timeout_s:.0f} s ({last})"
        time.sleep(POLL_S)


def reason(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        body = exc.read().decode(errors="replace")
        try:
            return f"HTTP {exc.code}: {json.loads(body)['error']}"
        except (ValueError, KeyError, TypeError):
            return f"HTTP {exc.code}: {body.strip()}"
    return str(exc)


def reload_pod(base: str, wanted: list[str], timeout_s: float, key: str) -> list[str]:
    """Loads the models on one pod, then waits for embed; returns the failures."""
    try:
        models = wanted or repository_models(base, key)
    except (OSError, ValueError) as exc:
        return [f"repository index: {reason(exc)}"]
    failures = []
    for model in models:
        try:
            post(f"{base}/v2/repository/models/{urllib.parse.quote(model, safe='')}/load", timeout_s, key)
        except OSError as exc:
            failures.append(f"{model}: {reason(exc)}")
            continue
        print(f"{base}: {model} loaded", flush=True)
    not_ready = wait_ready(base, EMBED, timeout_s)
    if not_ready:
        failures.append(f"{EMBED}: {not_ready}")
    else:
        print(f"{base}: {EMBED} ready, serving release {served_versions(base, EMBED)}", flush=True)
    return failures


def served_versions(base: str, model: str) -> str:
    """The versions the model's metadata lists (for the log; `embed` serves exactly one release)."""
    try:
        with urllib.request.urlopen(f"{base}/v2/models/{urllib.parse.quote(model, safe='')}", timeout=10) as response:
            return ",".join(json.loads(response.read()).get("versions", [])) or "?"
    except (OSError, ValueError, AttributeError):
        return "?"


def read_key(path: str, what: str) -> str:
    """The key in the file `path` (a mounted Secret), without surrounding whitespace such as a final newline.
    Exits when the file cannot be read, is empty or holds what a header cannot carry; the message names the
    file, never its content."""
    try:
        with open(path, encoding="utf-8") as file:
            key = file.read().strip()
    except OSError as exc:
        raise SystemExit(f"cannot read the {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SystemExit(f"the {what} file {path} is not UTF-8 text") from None
    if not key:
        raise SystemExit(f"the {what} file {path} is empty")
    if not (key.isascii() and key.isprintable()):
        raise SystemExit(f"the {what} file {path} holds characters other than printable ASCII")
    return key


def send_api_key(api_key: str) -> None:
    """Every request from now on carries `Authorization: Bearer <api_key>` (urlopen's opener)."""
    opener = urllib.request.build_opener()
    opener.addheaders = [*opener.addheaders, ("Authorization", f"Bearer {api_key}")]
    urllib.request.install_opener(opener)


def main() -> int:
    service = os.environ["TRITON_SERVICE"]
    port = int(os.environ.get("TRITON_HTTP_PORT", "8000"))
    wanted = [name for name in os.environ.get("RELOAD_MODELS", "").split(",") if name]
    timeout_s = float(os.environ.get("LOAD_TIMEOUT_S", "600"))
    admin_key_file = os.environ.get("ECOMSERVE_ADMIN_KEY_FILE")
    if not admin_key_file:
        raise SystemExit(
            "ECOMSERVE_ADMIN_KEY_FILE is not set: it names the file holding the admin key (a mounted Secret); "
            "the key is not read from the environment"
        )
    key = read_key(admin_key_file, "admin key")
    if os.environ.get("ECOMSERVE_API_KEY_FILE"):
        send_api_key(read_key(os.environ["ECOMSERVE_API_KEY_FILE"], "inference API key"))
    addresses = pod_addresses(service, port)
    failures = []
    for address in addresses:
        base = f"http://{f'[{address}]' if ':' in address else address}:{port}"
        failures += [f"{address}: {failure}" for failure in reload_pod(base, wanted, timeout_s, key)]
    for failure in failures:
        print(f"reload failed: {failure}", file=sys.stderr)
    print(f"{len(addresses)} pod(s), {len(failures)} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
