"""Triton python-backend models. Each repository model.py imports its TritonPythonModel from here,
so the logic is an ordinary, tested package module and the repository holds no code of its own.
These modules import triton_python_backend_utils and only load inside the Triton stub."""
