"""Project exceptions: each carries a message that tells the user what to do next."""


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
