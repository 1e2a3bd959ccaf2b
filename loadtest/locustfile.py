"""ecomserve's e-commerce traffic against Triton, over HTTP (KServe v2 JSON) and gRPC, and against ecomserve's
HTTP API (OpenAI /v1/embeddings, Cohere /v1/rerank: the api users, run with --protocols api).

Four scenarios, each a user class per protocol (the API has no classify endpoint); the mix (--weight-*), the
request sizes (--candidates, --recommend-items), the load shape (--shape), the SLO gate (--slo-*) and the plot are
options: see `locust -f loadtest/locustfile.py --help` and loadtest/README.md. Pick classes by naming them after the
options, e.g. `locust -f loadtest/locustfile.py … QueryEmbeddingGrpcUser`."""

import locust  # noqa: F401  first: gevent monkey-patches the standard library before anything else imports it

# isort: split
from api_users import ApiUser
from triton_users import TritonGrpcUser, TritonHttpUser
from wiring import ScenarioShape  # noqa: F401  the --shape load shape; importing wiring registers the options


class SearchHttpUser(TritonHttpUser):
    """rank: a query against --candidates catalog titles."""

    scenario = "search"


class SearchGrpcUser(TritonGrpcUser):
    scenario = "search"


class SearchApiUser(ApiUser):
    """POST /v1/rerank: the query and --candidates titles as documents."""

    scenario = "search"


class QueryEmbeddingHttpUser(TritonHttpUser):
    """embed: one short search query."""

    scenario = "query_embedding"


class QueryEmbeddingGrpcUser(TritonGrpcUser):
    scenario = "query_embedding"


class QueryEmbeddingApiUser(ApiUser):
    """POST /v1/embeddings: one query."""

    scenario = "query_embedding"


class RecommendationHttpUser(TritonHttpUser):
    """embed: --recommend-items catalog titles in one request."""

    scenario = "recommendation"


class RecommendationGrpcUser(TritonGrpcUser):
    scenario = "recommendation"


class RecommendationApiUser(ApiUser):
    """POST /v1/embeddings: --recommend-items titles."""

    scenario = "recommendation"


class CategoryHttpUser(TritonHttpUser):
    """classify: a catalog title against the catalog's categories."""

    scenario = "category"


class CategoryGrpcUser(TritonGrpcUser):
    scenario = "category"
