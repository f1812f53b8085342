"""Envoy external processing: the sidecar protects answers that pass through Envoy.

`bodies` reads and rewrites the answers of each inference API (pure functions), `frames`
the gRPC messages in an HTTP/2 body, `protect` is the one call that protects rows, and
`servicer` is the `envoy.service.ext_proc.v3.ExternalProcessor` service that wires them.
"""
