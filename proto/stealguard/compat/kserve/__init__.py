"""Open Inference Protocol v2 gRPC API (package inference), generated."""
