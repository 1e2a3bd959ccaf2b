"""The side-by-side benchmark behind `ecomserve bench`."""
