"""The front process before Triton: it owns the public HTTP and gRPC ports and passes on only requests
that passed its checks (policy.py: which APIs; kserve.py: well-formed tensors; admission.py: load).
Triton itself listens on private unix sockets (upstream.py)."""
