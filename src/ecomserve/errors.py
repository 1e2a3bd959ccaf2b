"""Project exceptions: each carries a message that tells the user what to do next."""

from collections.abc import Iterator
from contextlib import contextmanager


class EcomserveError(Exception):
    """Base class; the CLI prints the message and exits non-zero."""


class SpecError(EcomserveError):
    """The pipeline spec is missing or invalid."""


class ExportError(EcomserveError):
    """An encoder could not be exported or failed its parity check."""


class RepositoryError(EcomserveError):
    """The model repository is missing, incomplete or cannot be built."""


class ServerError(EcomserveError):
    """tritonserver could not be started or did not become ready."""


class InvalidInput(EcomserveError):
    """A request violates the bad-input rules; maps to HTTP 400 / gRPC INVALID_ARGUMENT."""


class RequestFailed(EcomserveError):
    """The server answered a request with an error (bad input, unknown model, overload)."""


class MissingExtra(EcomserveError):
    """An optional dependency group of the package (a pyproject extra) is not installed."""


# Top-level modules of the `export` extra: building a repository imports them, serving a built one does not.
EXPORT_MODULES = frozenset({"torch", "transformers", "onnx", "ml_dtypes", "openvino", "nncf"})


SERVE_BUILT = "or serve a repository that is already built: ecomserve serve --repository DIR"


@contextmanager
def export_extra(action: str, alternative: str = SERVE_BUILT) -> Iterator[None]:
    """Turn a missing `export` extra module, imported anywhere inside, into one line saying what to install."""
    try:
        yield
    except ModuleNotFoundError as exc:
        module = (exc.name or "").partition(".")[0]
        if module not in EXPORT_MODULES:
            raise
        otherwise = f" ({alternative})" if alternative else ""
        raise MissingExtra(
            f"{action} needs {module}, from the export extra: pip install 'ecomserve[export]'{otherwise}"
        ) from exc
