"""A TorchServe (0.12) handler whose answers pass through the stealguard sidecar.

`StealguardHandler` is TorchServe's `BaseHandler` with a postprocess that turns the model's
output into probabilities and sends them to the sidecar with the fail-closed `protect`:
if the sidecar cannot answer, each row becomes label-only (one-hot of its top-1); the raw
probabilities are never returned. Its preprocess reads a PNG image or a `.npy` array (one
sample or a batch) from the request's `data`, like `stealguard-modelserver`.

Archive a model with it (the handler file is this module; stealguard must be installed in
TorchServe's Python):

    torch-model-archiver --model-name mnist --version 1.0 --serialized-file model.pt \\
        --handler "$(python -c 'import stealguard.client.torchserve as h; print(h.__file__)')" \\
        --extra-files stealguard.yaml --export-path model-store

Settings (lowest to highest precedence): defaults; a `stealguard:` section of the model's
config file (`torch-model-archiver --config-file`); the extra file `stealguard.yaml` (or
`stealguard.json`); environment variables. Keys, with their variables:

    sidecar      STEALGUARD_SIDECAR          host:port of the sidecar (127.0.0.1:50051)
    policy       STEALGUARD_POLICY           name sent to the sidecar (the model's name);
                                             "none" answers without protection
    timeout      STEALGUARD_SIDECAR_TIMEOUT  seconds per sidecar call (1.0)
    transport    STEALGUARD_SIDECAR_TRANSPORT  stream (default: one long-lived
                                             PerturbStream per worker, each call one
                                             message on it) or unary (one Perturb each)
    output       STEALGUARD_OUTPUT           what the model returns: logits (default) or
                                             probabilities
    input_shape  -                           one sample's shape for the built-in
                                             preprocess, e.g. [1, 28, 28]
    token_file   STEALGUARD_SIDECAR_TOKEN_FILE  a file holding the bearer token the handler
                                             presents to the sidecar (none)
    principal_header  STEALGUARD_PRINCIPAL_HEADER  the request header naming the end client
                                             (e.g. x-client-id, set by the authenticating
                                             gateway in front of TorchServe); each
                                             request's rows are sent to the sidecar under
                                             it, so a metering sidecar charges that client.
                                             The sidecar believes it only when the token is
                                             marked as a gateway in its token file. Unset:
                                             every row is charged to the handler's token.

To keep your own preprocess, subclass `StealguardHandler` and override `preprocess`; each
output row is then one request's answer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from stealguard.client import DefenseClient, protect
from stealguard.client.defense import read_token_file
from stealguard.client.inputs import InputError, decode_input
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

log = logging.getLogger("stealguard.client.torchserve")

DEFAULTS: dict[str, Any] = {
    "sidecar": "127.0.0.1:50051",
    "policy": None,  # None: the TorchServe model name
    "timeout": 1.0,
    "transport": "stream",
    "output": "logits",
    "input_shape": None,
    "token_file": None,
    "principal_header": None,
}
ENVIRONMENT = {
    "sidecar": "STEALGUARD_SIDECAR",
    "policy": "STEALGUARD_POLICY",
    "timeout": "STEALGUARD_SIDECAR_TIMEOUT",
    "transport": "STEALGUARD_SIDECAR_TRANSPORT",
    "output": "STEALGUARD_OUTPUT",
    "token_file": "STEALGUARD_SIDECAR_TOKEN_FILE",
    "principal_header": "STEALGUARD_PRINCIPAL_HEADER",
}
PRINCIPAL_MAX = 128  # longer header values are cut (the sidecar's limit too)
SETTINGS_FILES = ("stealguard.yaml", "stealguard.yml", "stealguard.json")


def load_settings(model_dir: str | os.PathLike | None, model_yaml_config: Mapping | None,
                  model_name: str, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The handler's settings from its sources (see the module docstring), validated.

    Raises ValueError naming the source and key of a bad value."""
    settings = dict(DEFAULTS)
    layers: list[tuple[str, Mapping]] = []
    section = (model_yaml_config or {}).get("stealguard")
    if section is not None:
        layers.append(("model config 'stealguard' section", section))
    for name in SETTINGS_FILES:
        path = Path(model_dir or ".") / name
        if path.is_file():
            layers.append((str(path), _read(path)))
            break
    layers.append(("environment", {k: env[v] for k, v in ENVIRONMENT.items() if env.get(v)}))
    for source, values in layers:
        if not isinstance(values, Mapping):
            raise ValueError(f"{source}: expected a mapping of settings")
        unknown = set(values) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(DEFAULTS)}")
        settings.update(values)
    settings["policy"] = str(settings["policy"] or model_name)
    try:
        settings["timeout"] = float(settings["timeout"])
    except (TypeError, ValueError):
        raise ValueError(f"timeout must be seconds, got {settings['timeout']!r}") from None
    if not settings["timeout"] > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {settings['timeout']}")
    if settings["transport"] not in ("stream", "unary"):
        raise ValueError(f"transport must be 'stream' or 'unary', got {settings['transport']!r}")
    if settings["output"] not in ("logits", "probabilities"):
        raise ValueError(f"output must be 'logits' or 'probabilities', got {settings['output']!r}")
    if settings["input_shape"] is not None:
        settings["input_shape"] = tuple(int(s) for s in settings["input_shape"])
    if settings["principal_header"] is not None:
        header = str(settings["principal_header"]).strip().lower()
        if not header or any(c.isspace() or c == ":" for c in header):
            raise ValueError(f"principal_header must be an HTTP header name, got "
                             f"{settings['principal_header']!r}")
        settings["principal_header"] = header
    settings["token"] = (read_token_file(settings["token_file"], "token_file")
                         if settings["token_file"] else None)
    return settings


def _read(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())  # JSON is YAML too
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read stealguard settings: {exc}") from None


class StealguardHandler(BaseHandler):
    """BaseHandler + the sidecar: preprocess (PNG/.npy) → inference → protect → JSON rows."""

    def initialize(self, context) -> None:
        super().initialize(context)
        properties = context.system_properties
        self.settings = load_settings(properties.get("model_dir"),
                                      getattr(context, "model_yaml_config", None),
                                      context.model_name)
        self.sidecar = DefenseClient(self.settings["sidecar"], timeout=self.settings["timeout"],
                                     stream=self.settings["transport"] == "stream",
                                     token=self.settings["token"])
        self._requests: list[tuple[int, bool]] | None = None
        self._principals: list[str] | None = None
        log.info("stealguard: model %s protected by sidecar %s (%s), policy %r",
                 context.model_name, self.settings["sidecar"], self.settings["transport"],
                 self.settings["policy"])

    def preprocess(self, data: list[Mapping[str, Any]]) -> torch.Tensor:
        """Each request's `data` (PNG or .npy) → one float32 batch of all their samples."""
        input_shape = self.settings["input_shape"]
        if input_shape is None:
            raise PredictionException(
                "stealguard handler: set input_shape (e.g. [1, 28, 28]) in stealguard.yaml "
                "to use its PNG/.npy preprocess, or override preprocess", 500)
        batches, self._requests = [], []
        self._principals = [self._principal(index) for index in range(len(data))]
        for index, row in enumerate(data):
            payload = row.get("data") if row.get("data") is not None else row.get("body")
            try:
                if payload is None:
                    raise InputError("input 'data' is missing: put PNG or .npy bytes under 'data'")
                if isinstance(payload, str):
                    payload = payload.encode("latin-1")
                batch, is_batch = decode_input(payload, input_shape)
            except InputError as error:
                raise PredictionException(f"request {index}: {error}", 400) from None
            batches.append(batch)
            self._requests.append((len(batch), is_batch))
        return torch.from_numpy(np.concatenate(batches)).to(self.device)

    def _principal(self, index: int) -> str:
        """The end client of request `index`: its `principal_header`, or "" (the handler's
        own token is charged)."""
        header = self.settings["principal_header"]
        context = getattr(self, "context", None)
        if header is None or context is None:
            return ""
        value = context.get_request_header(index, header)
        if value is None:  # TorchServe keeps the header's case as sent
            headers = context.get_all_request_header(index) or {}
            value = next((v for k, v in headers.items() if str(k).lower() == header), None)
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace")
        return str(value).strip()[:PRINCIPAL_MAX] if value else ""

    def postprocess(self, data: torch.Tensor) -> list:
        """Model output → probabilities → the sidecar (fail-closed) → one answer per request."""
        output = data.detach().cpu().double()
        if self.settings["output"] == "logits":
            output = torch.softmax(output, dim=1)
        probs = output.numpy()
        requests, self._requests = self._requests, None
        principals, self._principals = self._principals, None
        if self.settings["policy"] != "none":
            probs = self._protect(probs, requests, principals)
        if requests is None:  # a subclass's own preprocess: one row per request
            return probs.tolist()
        answers, start = [], 0
        for rows, is_batch in requests:
            part = probs[start : start + rows]
            answers.append(part.tolist() if is_batch else part[0].tolist())
            start += rows
        return answers

    def _protect(self, probs: np.ndarray, requests: list[tuple[int, bool]] | None,
                 principals: list[str] | None) -> np.ndarray:
        """The sidecar's answer for every row: one call per end client in the batch, so
        each is charged for its own rows (one call when no principal header is set)."""
        policy = self.settings["policy"]
        if not requests or not principals or len(set(principals)) == 1:
            return protect(self.sidecar, probs, model=policy,
                           principal=principals[0] if principals else "")
        owner = np.repeat(np.arange(len(requests)), [rows for rows, _ in requests])
        out = np.empty_like(probs)
        for principal in dict.fromkeys(principals):
            rows = np.isin(owner, [i for i, p in enumerate(principals) if p == principal])
            out[rows] = protect(self.sidecar, probs[rows], model=policy, principal=principal)
        return out

