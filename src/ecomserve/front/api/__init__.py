"""The HTTP API on the front's API port: the OpenAI, Cohere/Jina and TEI schemas (and ecomserve's own
search and classify) in front of the same Triton models, called over Triton's private gRPC socket."""
