"""Proxy mode: the sidecar speaks the model server's own gRPC inference API.

`stealguard-sidecar proxy --upstream HOST:PORT --protocol torchserve|v2` serves TorchServe's
`InferenceAPIsService` or the Open Inference Protocol's `GRPCInferenceService`, forwards
every call to the real server (metadata and deadline included) and protects the
probabilities in its answer with the policy of the requested model. Clients change only
the address they call; the model server does not change at all.

Modules: `options` (proxy keys of a policy), `predictions` (TorchServe JSON),
`tensors` (v2 output tensors), `upstream` (the channel to the real server),
`errors` (the proxy's domain errors), `base`, `torchserve` and `v2` (the servicers),
`app` (assembly and upstream health), `cli` (the `proxy` subcommand).
"""
