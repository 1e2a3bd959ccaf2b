"""ecomserve's e-commerce traffic against Triton, over HTTP (KServe v2 JSON) and gRPC, and against ecomserve's
HTTP API (OpenAI /v1/embeddings, Cohere /v1/rerank, /v1/search, /v1/similar: the api users, run with --protocols api).

Six scenarios, each a user class per protocol (the API has no classify endpoint); the mix (--weight-*; the catalog
scenarios, which need the server's index of the load test's catalog, are off unless weighted), the request sizes
(--candidates, --recommend-items, --top-k), the search modes and filters (--search-modes, --filter-share), the load
shape (--shape), the SLO gate (--slo-*) and the plot are options: see `locust -f loadtest/locustfile.py --help` and
loadtest/README.md. Pick classes by naming them after the options, e.g.
`locust -f loadtest/locustfile.py … QueryEmbeddingGrpcUser` (a named class runs whatever its weight)."""

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


class CatalogSearchHttpUser(TritonHttpUser):
    """search: a query against the catalog index, MODE from --search-modes, a FILTER in --filter-share of them."""

    scenario = "catalog_search"


class CatalogSearchGrpcUser(TritonGrpcUser):
    scenario = "catalog_search"


class CatalogSearchApiUser(ApiUser):
    """POST /v1/search: query, top_k, mode and sometimes a filter."""

    scenario = "catalog_search"


class SimilarHttpUser(TritonHttpUser):
    """similar: one catalog item, or a history of 3 to 5, a FILTER in --filter-share of them."""

    scenario = "similar"


class SimilarGrpcUser(TritonGrpcUser):
    scenario = "similar"


class SimilarApiUser(ApiUser):
    """POST /v1/similar: ids, top_k and sometimes a filter."""

    scenario = "similar"
