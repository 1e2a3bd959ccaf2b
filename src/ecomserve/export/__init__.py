"""PyTorch / Hugging Face → ONNX with pooling and normalisation in the graph, verified against PyTorch."""
