"""The handler pipeline of one model: preprocess → inference → protect → postprocess.

    preprocess   the request's `data` (PNG or .npy) → a float32 batch (inputs.py)
    inference    the torch module → logits → softmax in float64 → probabilities
    protect      the protect core (`stealguard.server.core`: the rate limit, then the
                 observers: metrics) around the sidecar call (`protect_async`,
                 fail-closed: if the sidecar cannot answer within min(--sidecar-timeout,
                 what is left of the caller's deadline), label-only one-hot rows, never
                 the raw probabilities); the identity for a model whose policy is `none`
    postprocess  JSON: the probability vector, or a list of vectors for a batch

With extraction detection on (`--detect prada`, `stealguard.modelserver.watch`), the
inputs and the predicted classes go to the detector after inference, and the core asks
its escalation ladder which answer the principal gets (its policy, another sidecar
policy, labels only, or a refusal).

A `Handler` is the core's policy for its model (named after the model, so metrics are by
model). `Models` holds the handlers of every model in the store and resolves them for the
core. Nothing here sees a protobuf, and nothing loads numba: the defense runs in the
sidecar.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from stealguard.client import AsyncDefenseClient, SidecarError, label_only, protect_async
from stealguard.client.inputs import InputError, decode_input
from stealguard.modelserver.metrics import Recorder
from stealguard.modelserver.store import ModelSpec, UnknownModel
from stealguard.server.core import ANONYMOUS, ProtectCore

if TYPE_CHECKING:  # the detector (scipy) loads only when detection is on
    from stealguard.modelserver.watch import Watch

INFERENCE_CHUNK = 256  # rows per forward pass, so a large batch cannot exhaust memory
DATA_KEYS = ("data", "body")  # TorchServe's handlers read either key

log = logging.getLogger("stealguard.modelserver")


class Handler:
    """One model's pipeline. `handle(inputs)` returns the JSON `prediction` bytes."""

    def __init__(self, spec: ModelSpec, module: torch.nn.Module,
                 sidecar: AsyncDefenseClient | None, executor: Executor | None = None,
                 max_batch: int = 1024, recorder: Recorder | None = None,
                 core: ProtectCore | None = None, watch: Watch | None = None):
        if spec.protected and sidecar is None:
            raise ValueError(f"model {spec.name!r} has policy {spec.policy!r}: it needs a sidecar")
        self.spec = spec
        self.module = module
        self.sidecar = sidecar
        self.executor = executor
        self.max_batch = max_batch
        self.recorder = recorder or Recorder(enabled=False)
        self.core = core or ProtectCore(_Only(self))
        self.watch = watch

    @property
    def name(self) -> str:
        """The core's policy name: the model's (metrics are by model)."""
        return self.spec.name

    @property
    def protected(self) -> bool:
        """Whether answers go through the sidecar (escalation leaves the others alone)."""
        return self.spec.protected

    def using(self, policy: str) -> _Bound:
        """This model as the core's policy, calling the sidecar with `policy` instead of
        its own (an escalation step naming a stronger policy)."""
        return _Bound(self, None, sidecar_policy=policy)

    def perturb(self, rows: np.ndarray, logits: bool = False):
        """The core's perturb step, with no caller deadline (see `protect`)."""
        return self.protect(rows)

    def preprocess(self, inputs: Mapping[str, bytes]) -> tuple[np.ndarray, bool]:
        """The request's input map → (float32 batch (N, *input_shape), is_batch)."""
        data = next((inputs[key] for key in DATA_KEYS if key in inputs), None)
        if data is None:
            given = ", ".join(repr(k) for k in inputs) or "none"
            raise InputError(f"input 'data' is missing (keys given: {given}); "
                             "put the PNG or .npy bytes under 'data'")
        batch, is_batch = decode_input(data, self.spec.input_shape)
        if len(batch) > self.max_batch:
            raise InputError(f"the batch holds {len(batch)} samples; this server takes at most "
                             f"{self.max_batch} per request (--max-batch): split it")
        return batch, is_batch

    def inference(self, batch: np.ndarray) -> np.ndarray:
        """float32 batch → float64 probabilities (N, classes)."""
        rows = []
        with torch.inference_mode():
            for start in range(0, len(batch), INFERENCE_CHUNK):
                logits = self.module(torch.from_numpy(batch[start : start + INFERENCE_CHUNK]))
                rows.append(torch.softmax(logits.double(), dim=1).numpy())
        probs = np.concatenate(rows)
        if probs.shape[1] != len(self.spec.labels):
            raise RuntimeError(f"model {self.spec.name!r} returned {probs.shape[1]} classes, "
                               f"its manifest lists {len(self.spec.labels)} labels")
        return probs

    async def protect(self, probs: np.ndarray, deadline: float | None = None,
                      principal: str = "", policy: str | None = None) -> np.ndarray:
        """The sidecar's perturbation of `probs`, failing closed; identity for policy none.

        `policy`: the sidecar policy to ask for instead of the model's own (escalation).

        `principal` is the end client, sent with the rows: a sidecar that meters charges
        it there when the model server's sidecar token is marked as a gateway. When the
        model server meters too (its core has a limiter), the rows are sent as charged
        already, so that sidecar does not charge them a second time.

        `deadline` is the caller's, in `time.monotonic()` seconds: the sidecar gets
        min(its timeout, the time left), so the model server never waits for the sidecar
        longer than its caller waits for the answer. Every failure (an error status,
        no answer in time) gives label-only rows, counted by the sidecar's status code.
        """
        if not self.spec.protected:
            return probs
        budget = self.sidecar.timeout
        if deadline is not None:
            budget = min(budget, deadline - time.monotonic())
        try:
            return await protect_async(self.sidecar, probs, model=policy or self.spec.policy,
                                       on_error="raise", timeout=budget,
                                       principal=principal,
                                       charged=self.core.limiter is not None)
        except SidecarError as error:
            code, reason = error.code.name, str(error)
        log.warning("sidecar failed (%s) for model %r: answering label-only", reason,
                    self.spec.name)
        self.recorder.fail_closed(self.spec.name, code)
        return label_only(probs)

    def postprocess(self, probs: np.ndarray, is_batch: bool) -> bytes:
        """JSON: one probability vector, or a list of them for a batch."""
        return json.dumps(probs.tolist() if is_batch else probs[0].tolist()).encode()

    def _preprocess_and_infer(self, inputs: Mapping[str, bytes],
                              client: str) -> tuple[np.ndarray, bool]:
        batch, is_batch = self.preprocess(inputs)
        probs = self.inference(batch)
        if self.watch is not None:
            self.watch.observe(self.spec, client, batch, probs)  # before the answer is chosen
        return probs, is_batch

    async def handle(self, inputs: Mapping[str, bytes], deadline: float | None = None,
                     client: str = ANONYMOUS) -> bytes:
        """Run the pipeline. Raises InputError for input the model cannot take, and the
        core's refusals (`Exhausted` over the rate limit).

        `deadline`: the caller's (see `protect`); `client`: its principal.
        """
        loop = asyncio.get_running_loop()
        # decoding and the forward pass run off the event loop (torch releases the GIL)
        probs, is_batch = await loop.run_in_executor(
            self.executor, self._preprocess_and_infer, inputs, client
        )
        answer = await self.core.protect(probs, _Bound(self, deadline, client), client)
        return self.postprocess(answer.rows, is_batch)


class _Bound:
    """A handler as the core's policy for one call: its sidecar call gets that call's
    deadline (and `sidecar_policy` instead of the model's, when escalation says so)."""

    __slots__ = ("handler", "deadline", "name", "principal", "sidecar_policy")

    def __init__(self, handler: Handler, deadline: float | None, principal: str = "",
                 sidecar_policy: str | None = None):
        self.handler, self.deadline, self.name = handler, deadline, handler.spec.name
        self.principal = "" if principal == ANONYMOUS else principal
        self.sidecar_policy = sidecar_policy

    @property
    def protected(self) -> bool:
        return self.handler.spec.protected

    def using(self, policy: str) -> _Bound:
        """This call with the sidecar's `policy` instead of the model's."""
        return _Bound(self.handler, self.deadline, self.principal, policy)

    def perturb(self, rows: np.ndarray, logits: bool = False):
        return self.handler.protect(rows, self.deadline, self.principal, self.sidecar_policy)


class _Only:
    """The policies of a lone handler (a core built for it alone)."""

    def __init__(self, handler: Handler):
        self.handler = handler

    def resolve(self, name: str) -> Handler:
        return self.handler


def load_module(spec: ModelSpec) -> torch.nn.Module:
    """The torch module a manifest describes, in eval mode."""
    if spec.architecture == "torchscript":
        module = torch.jit.load(str(spec.weights), map_location="cpu")
    else:
        from stealguard.modelserver.architectures import build_model

        module = build_model(spec.architecture, spec.input_shape, len(spec.labels))
        module.load_state_dict(torch.load(spec.weights, map_location="cpu", weights_only=True))
    return module.eval()


class Models:
    """The handlers of every model in a store, found by name (and optional version)."""

    def __init__(self, specs: Mapping[str, ModelSpec], sidecar: AsyncDefenseClient | None,
                 executor: Executor | None = None, max_batch: int = 1024,
                 recorder: Recorder | None = None, core: ProtectCore | None = None,
                 watch: Watch | None = None):
        modules: dict[Path, torch.nn.Module] = {}  # models that share weights share a module
        self.handlers: dict[str, Handler] = {}
        self.core = core or ProtectCore(self)
        if self.core.policies is None:  # a core built for these models: they are its policies
            self.core.policies = self
        for name, spec in specs.items():
            key = spec.weights.resolve()
            if key not in modules:
                modules[key] = load_module(spec)
            self.handlers[name] = Handler(spec, modules[key], sidecar, executor, max_batch,
                                          recorder, self.core, watch)

    def resolve(self, name: str) -> Handler:
        """The core's policy lookup: the handler of model `name` (`UnknownModel`)."""
        return self.get(name)

    def warm_up(self) -> None:
        """One forward pass per model, so the first request is not the slow one."""
        for handler in self.handlers.values():
            handler.inference(np.zeros((1, *handler.spec.input_shape), np.float32))

    def get(self, name: str, version: str = "") -> Handler:
        """The handler for `name`; raises UnknownModel naming the models that exist."""
        handler = self.handlers.get(name)
        if handler is None:
            known = ", ".join(sorted(self.handlers)) or "none"
            raise UnknownModel(f"model {name!r} is not in the model store (models: {known})")
        if version and version != handler.spec.version:
            raise UnknownModel(f"model {name!r} has no version {version!r} "
                               f"(version: {handler.spec.version})")
        return handler
