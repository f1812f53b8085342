"""The proxy's keys of a policy entry, and the policy set the proxy resolves per model.

A policy entry of the YAML may carry, besides its defense and parameters:

    on_unrecognized: reject | pass   # an answer with no recognisable probabilities:
                                     # reject = error status (default, fail-closed),
                                     # pass = returned unchanged
    outputs: [predict_proba, ...]    # v2 only: the output tensors that hold probabilities

`PolicySet.from_config` skips these keys (`PROXY_KEYS`), so `make_defense` never sees them
and one YAML serves the sidecar and the proxy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stealguard.server.config import ConfigError
from stealguard.server.policies import Policy, PolicySet

REJECT = "reject"
PASS = "pass"
ON_UNRECOGNIZED = (REJECT, PASS)
# The v2 output names that hold probabilities when a policy does not list its own.
DEFAULT_OUTPUTS = ("probabilities", "predict_proba")


@dataclass(frozen=True)
class ProxyPolicy:
    """A sidecar policy plus what the proxy does with answers it cannot read."""

    policy: Policy
    on_unrecognized: str = REJECT
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def passes_unrecognized(self) -> bool:
        return self.on_unrecognized == PASS


class ProxyPolicies:
    """Resolves a model name to its `ProxyPolicy` (the sidecar's default fallback applies)."""

    def __init__(self, policies: PolicySet, options: Mapping[str, dict[str, Any]]):
        self.policies = policies
        self._resolved = {
            p.name: ProxyPolicy(policy=p, **options.get(p.name, {})) for p in policies
        }

    @classmethod
    def from_config(
        cls, specs: Mapping[str, Mapping[str, Any]], secret: bytes
    ) -> ProxyPolicies:
        """Build the policies of `specs`; `ConfigError` names a bad policy or proxy key."""
        options = {name: _proxy_options(name, spec) for name, spec in specs.items()}
        return cls(PolicySet.from_config(specs, secret), options)  # it skips PROXY_KEYS

    def resolve(self, model: str) -> ProxyPolicy:
        """The policy of `model` (else `default`); raises `UnknownModel` if neither exists."""
        return self._resolved[self.policies.resolve(model).name]

    def __iter__(self):
        return iter(self._resolved.values())


def _proxy_options(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if "on_unrecognized" in spec:
        value = spec["on_unrecognized"]
        if value not in ON_UNRECOGNIZED:
            raise ConfigError(
                f"policy {name!r}: on_unrecognized must be 'reject' or 'pass', got {value!r}"
            )
        options["on_unrecognized"] = value
    if "outputs" in spec:
        value = spec["outputs"]
        if isinstance(value, str):
            value = [value]
        if (
            not isinstance(value, Sequence)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise ConfigError(
                f"policy {name!r}: outputs must be a non-empty list of output tensor names, "
                f"got {value!r}"
            )
        options["outputs"] = tuple(value)
    return options
