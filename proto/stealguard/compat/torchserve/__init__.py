"""TorchServe gRPC inference API (org.pytorch.serve.grpc.inference), generated."""
