"""stealguard.v1: generated code of the sidecar API (proto/stealguard/v1/defense.proto)."""
