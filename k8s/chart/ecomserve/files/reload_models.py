#!/usr/bin/env python3
"""Model reload Job: every ready Triton pod behind the headless Service reloads its models in place.

With --model-control-mode=explicit, a load request for a model that is already loaded makes Triton
read the repository again, load what is there now beside the serving version, and switch once it is
ready; if the load fails, the serving version stays. Pods are done one after another, so at most one
pod at a time holds two versions in memory. Any failure makes the Job (and `helm upgrade`) fail.

Environment: TRITON_SERVICE (headless Service DNS name), TRITON_HTTP_PORT, RELOAD_MODELS (comma
separated, in order; empty: every model in the repository index), LOAD_TIMEOUT_S.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request


def pod_addresses(service: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(service, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {service}: {exc} (no ready pods?)") from None
    return sorted({info[4][0] for info in infos})


def post(url: str, timeout_s: float) -> bytes:
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return response.read()


def repository_models(base: str) -> list[str]:
    index = json.loads(post(f"{base}/v2/repository/index", 30))
    return list(dict.fromkeys(entry["name"] for entry in index))


def reason(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        body = exc.read().decode(errors="replace")
        try:
            return f"HTTP {exc.code}: {json.loads(body)['error']}"
        except (ValueError, KeyError, TypeError):
            return f"HTTP {exc.code}: {body.strip()}"
    return str(exc)


def main() -> int:
    service = os.environ["TRITON_SERVICE"]
    port = int(os.environ.get("TRITON_HTTP_PORT", "8000"))
    wanted = [name for name in os.environ.get("RELOAD_MODELS", "").split(",") if name]
    timeout_s = float(os.environ.get("LOAD_TIMEOUT_S", "600"))
    addresses = pod_addresses(service, port)
    failures = []
    for address in addresses:
        base = f"http://{f'[{address}]' if ':' in address else address}:{port}"
        try:
            models = wanted or repository_models(base)
        except (OSError, ValueError) as exc:
            failures.append(f"{address}: repository index: {reason(exc)}")
            continue
        for model in models:
            try:
                post(f"{base}/v2/repository/models/{urllib.parse.quote(model, safe='')}/load", timeout_s)
            except OSError as exc:
                failures.append(f"{address}: {model}: {reason(exc)}")
                continue
            print(f"{address}: {model} reloaded", flush=True)
    for failure in failures:
        print(f"reload failed: {failure}", file=sys.stderr)
    print(f"{len(addresses)} pod(s), {len(failures)} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
