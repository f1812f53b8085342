"""The gRPC platform every stealguard server stands on: the sidecar, the proxy and the
model server. It knows gRPC, not defenses: importing it never imports numba.

Modules:
    app           `GrpcApp`: a grpc.aio server with options, ports, TLS, health, reflection
    lifecycle     one lifecycle: warm-up hook -> SERVING -> drain on SIGTERM -> reload on
                  SIGHUP (`Service`, `run`), and `serve_workers` (N processes, one port)
    status        domain error kinds -> gRPC status, in one place (`grpc_status`, `unary`,
                  `streaming`, `status_message`)
    identity      who is calling: `Identity` (token name, mTLS subject, client header)
    interceptors  `AuthInterceptor` (tokens), `CallMetricsInterceptor` (in flight, latency)
    credentials   TLS server credentials, bearer token files
    metrics       the shared Prometheus registry, per-client series, `serve_metrics`
    lenient       request bytes that do not parse -> INVALID_ARGUMENT

The protocol-free layer beneath the front ends is `stealguard.server.core` (the protect
core) and `stealguard.server.errors` (the domain errors); see docs/architecture.md.
"""
