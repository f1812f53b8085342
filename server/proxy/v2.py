"""The Open Inference Protocol's `GRPCInferenceService`, forwarded with probabilities protected.

`ModelInfer` answers have the outputs the model's policy names protected (`tensors`);
the other RPCs are forwarded as they are, except that `ServerReady` is false while the
proxy itself cannot serve yet.
"""

from __future__ import annotations

from stealguard.compat.kserve import grpc_predict_v2_pb2 as v2
from stealguard.compat.kserve import grpc_predict_v2_pb2_grpc as v2_grpc
from stealguard.server.platform import status
from stealguard.server.platform.lenient import add_lenient
from stealguard.server.proxy.base import ProxyServicer
from stealguard.server.proxy.tensors import protect_outputs

SERVICE = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class V2Proxy(ProxyServicer, v2_grpc.GRPCInferenceServiceServicer):
    """Serves the v2 inference API in front of a v2 upstream (Triton, KServe, MLServer...)."""

    service = SERVICE
    stub_class = v2_grpc.GRPCInferenceServiceStub

    def add_to(self, server) -> None:
        add_lenient(v2_grpc.add_GRPCInferenceServiceServicer_to_server, self, server)

    async def upstream_ready(self, timeout: float) -> bool:
        """The upstream's own `ServerReady`."""
        reply = await self.upstream.probe(self.stub.ServerReady, v2.ServerReadyRequest(),
                                          timeout)
        return reply.ready

    @status.unary
    async def ServerLive(self, request, context):
        return await self.upstream.unary(self.stub.ServerLive, request, context)

    @status.unary
    async def ServerReady(self, request, context):
        reply = await self.upstream.unary(self.stub.ServerReady, request, context)
        if self.core.unavailable is not None:
            reply.ready = False
        return reply

    @status.unary
    async def ModelReady(self, request, context):
        return await self.upstream.unary(self.stub.ModelReady, request, context)

    @status.unary
    async def ServerMetadata(self, request, context):
        return await self.upstream.unary(self.stub.ServerMetadata, request, context)

    @status.unary
    async def ModelMetadata(self, request, context):
        return await self.upstream.unary(self.stub.ModelMetadata, request, context)

    @status.unary
    async def ModelInfer(self, request, context):
        policy = self.policy(request.model_name)
        principal = self.identity.of(context)
        with self.streams.call(principal):
            response = await self.upstream.unary(self.stub.ModelInfer, request, context)
            await protect_outputs(response, policy, request.model_name,
                                  self.perturber(policy, context, principal))
        return response
