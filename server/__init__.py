"""stealguard.server: the sidecar — defenses, policies, tensor codec, gRPC service, CLI.

Kept free of imports so that `stealguard.server.codec` is cheap for the client library.
"""
