"""One Milvus Lite server for several processes: `start_milvus_lite`, and for development
`python -m ecomserve.index.milvus_lite FILE.db [--port 19530]`.

milvus_lite ships a `milvus` binary: `milvus DB_FILE ADDRESS LOG_LEVEL [LOCK_FILE]`. pymilvus runs it for a
`.db` uri on a private unix socket and connects only the calling process. Started here on a loopback TCP port
instead, any number of processes connect with MilvusClient(uri="http://127.0.0.1:PORT"). The binary watches
the lock file: it stops by itself when the starting process releases the lock, also when that process dies.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ecomserve.index.milvus_index import forget_server, serve_through
from ecomserve.index.vector_index import VectorIndexError
from ecomserve.server.process import free_port, port_is_free


class MilvusLiteServer:
    """A running Milvus Lite server; `uri` is what every process passes to MilvusClient / search.milvus.uri."""

    def __init__(self, uri: str, db_file: Path, process: subprocess.Popen, lock: IO[str], log: Path) -> None:
        self.uri, self.db_file, self.log = uri, db_file, log
        self._process: subprocess.Popen | None = process
        self._lock: IO[str] | None = lock

    def stop(self) -> None:
        # Releasing the lock is the binary's signal to shut down cleanly; it is killed if it does not.
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None
        forget_server(self.db_file, self.uri)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> MilvusLiteServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_milvus_lite(
    db_file: Path, host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 30.0
) -> MilvusLiteServer:
    """Serve `db_file` on host:port (a free port if None) until stop(), or until this process exits.
    The log goes to `.<db name>.log` beside the file."""
    db_file = Path(db_file).expanduser().resolve()
    # milvus_lite's own limits on the file name (it names internal files after it).
    if not re.fullmatch(r"[a-zA-Z0-9.\-_]+", db_file.name) or len(db_file.name) > 36 or db_file.suffix != ".db":
        raise VectorIndexError(f"{db_file.name}: a Milvus Lite file name is at most 36 of [a-zA-Z0-9.-_] ending .db")
    if not db_file.parent.is_dir():
        raise VectorIndexError(f"Milvus Lite file {db_file}: folder {db_file.parent} does not exist")
    spec = importlib.util.find_spec("milvus_lite")
    binary = (
        Path(spec.submodule_search_locations[0]) / "lib" / "milvus"
        if spec and spec.submodule_search_locations
        else None
    )
    if binary is None or not binary.is_file():
        raise VectorIndexError("Milvus Lite is not installed: pip install 'ecomserve[milvus]'")
    lock_path = db_file.parent / f".{db_file.name}.lock"  # the name pymilvus' in-process Milvus Lite uses too
    lock = lock_path.open("a")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise VectorIndexError(f"Milvus Lite file {db_file} is already open in another process") from None
    if port is not None and not port_is_free(host, port):
        lock.close()
        raise VectorIndexError(f"{host}:{port} is in use: choose another port for Milvus Lite")
    log = db_file.parent / f".{db_file.name}.log"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    deadline = time.monotonic() + timeout_s
    for _attempt in range(3):  # a free port can be taken between choosing and binding it
        chosen = port or free_port(host)
        with log.open("w") as log_file:
            process = subprocess.Popen(
                [str(binary), str(db_file), f"{host}:{chosen}", os.environ.get("LOG_LEVEL", "ERROR"), str(lock_path)],
                cwd=db_file.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the owner, which stops the server in order
            )
        while process.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection((host, chosen), timeout=1).close()
            except OSError:
                time.sleep(0.05)
                continue
            server = MilvusLiteServer(f"http://{host}:{chosen}", db_file, process, lock, log)
            serve_through(db_file, server.uri)
            return server
        if process.poll() is None:
            process.kill()
            process.wait()
            break
        if port is not None:
            break
    lock.close()
    tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
    raise VectorIndexError(f"Milvus Lite did not start serving {db_file} on {host}: see {log}\n{tail}")


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m ecomserve.index.milvus_lite FILE.db [--port 19530]`: a shared Milvus Lite for
    development, until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m ecomserve.index.milvus_lite", description="serve a Milvus Lite file to several processes"
    )
    parser.add_argument("db_file", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=19530)
    args = parser.parse_args(argv)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with start_milvus_lite(args.db_file, args.host, args.port) as server:
        print(f"Milvus Lite serving {server.db_file} at {server.uri} (log {server.log}); set search.milvus.uri to it")
        try:
            while server.running and not stopping.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
