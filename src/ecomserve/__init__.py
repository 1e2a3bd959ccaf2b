"""ecomserve: text encoders served by Triton for e-commerce search and recommendation."""

__version__ = "0.1.0"
