"""stealguard.server: the sidecar and what every stealguard server stands on — the protect
core (`core`, `errors`, `limits`), metering and the trust model (`metering/`,
`principal`), the settings model (`settings`, `config`), the gRPC platform (`platform/`),
the defenses, policies, tensor codec, `Defense` servicer, proxy and CLI.
docs/architecture.md maps the layers.

Kept free of imports so that `stealguard.server.codec` is cheap for the client library.
"""
