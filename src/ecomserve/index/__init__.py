"""The catalog index: item embeddings searched by inner product, behind one small interface."""
