"""Where the embedded tritonserver lives and what it needs around it.

The nvidia-pytriton wheel ships tritonserver 2.51.0, the python backend, stubs for several Pythons,
the local response cache and its shared libraries. The python backend expects its stub beside
libtriton_python.so, so a backend folder for the running Python is assembled once per install."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from ecomserve.errors import ServerError


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path
    cache_dir: Path
    library_dir: Path

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.library_dir), env.get("LD_LIBRARY_PATH")]))
        # The stub embeds an isolated interpreter that ignores PYTHONPATH and finds its prefix by looking
        # up `python3` on PATH: this environment's interpreter must come first, or the stub runs on the
        # system Python without ecomserve (a venv used without `activate`, a systemd unit, cron).
        env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
        return env


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError:
        raise ServerError("tritonserver not found: pip install nvidia-pytriton==0.7.0 (it ships the binary)") from None
    return Path(pytriton.__file__).parent


def locate_triton(work_dir: Path) -> TritonInstall:
    """Find the wheel's tritonserver and prepare a python backend folder under `work_dir`."""
    root = _pytriton_root()
    server_dir = root / "tritonserver"
    binary = server_dir / "bin" / "tritonserver"
    if not os.access(binary, os.X_OK):
        raise ServerError(f"tritonserver binary missing or not executable at {binary}: reinstall nvidia-pytriton")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton ships no python backend stub for Python {python}; use Python 3.11")
    library_dir = root.parent / "nvidia_pytriton.libs"
    return TritonInstall(
        binary=binary,
        backend_dir=_assemble_backends(server_dir / "backends", stub, work_dir / "backends"),
        cache_dir=server_dir / "caches",
        library_dir=library_dir,
    )


def _assemble_backends(shipped: Path, stub: Path, target: Path) -> Path:
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (shipped / "python").iterdir():
        link = python_dir / item.name
        if not link.exists():
            link.symlink_to(item)
    stub_copy = python_dir / stub.name
    if not stub_copy.exists() or stub_copy.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, stub_copy)
    return target
