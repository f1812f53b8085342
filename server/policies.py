"""Policies: which defense, with which parameters, protects which model.

A request's `model` picks the policy of that name; a model without one gets the
`default` policy; with no `default`, the model is unknown (`UnknownModel`, a `NotFound`).
A `Policy` is what the protect core (`stealguard.server.core`) perturbs with in process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from stealguard.server.config import ConfigError
from stealguard.server.defenses import make_defense
from stealguard.server.errors import InvalidInput, NotFound

DEFAULT = "default"
# Policy keys that configure the proxy, not the defense: one YAML serves the sidecar and
# the proxy, so the sidecar accepts them and leaves them to the proxy.
PROXY_KEYS = ("on_unrecognized", "outputs")


class UnknownModel(NotFound, LookupError):
    """No policy is named after the model and there is no default policy."""


@dataclass(frozen=True)
class Policy:
    """A named defense. `perturb` validates and perturbs one batch of rows."""

    name: str
    defense: Any  # a stealguard.server.defenses Defense (callable, and perturb_flat)

    @property
    def defense_name(self) -> str:
        return self.defense.name

    @property
    def params(self) -> dict[str, float]:
        return dict(self.defense.params)

    def perturb(self, rows: np.ndarray, logits: bool = False) -> np.ndarray:
        """The protect core's step: the protected copy of 2-D `rows`, by the flat kernel
        path when the rows allow it. The defenses' `ValueError` (their documented way of
        saying a row is not valid) becomes `InvalidInput`; nothing else is caught."""
        n, k = rows.shape
        try:
            return self.defense.perturb_flat(rows.reshape(-1), n, k, logits=logits
                                             ).reshape(n, k)
        except ValueError as error:
            raise InvalidInput(str(error)) from None


class PolicySet:
    """An immutable mapping of policy names to policies, with the default fallback."""

    def __init__(self, policies: Mapping[str, Policy]):
        self._policies = dict(policies)
        self._default = self._policies.get(DEFAULT)

    @classmethod
    def from_config(cls, specs: Mapping[str, Mapping[str, Any]], secret: bytes) -> PolicySet:
        """Build every policy of `specs` ({name: {defense: ..., params...}}).

        Raises `ConfigError` naming the policy whose defense or parameters are wrong.
        """
        policies = {}
        for name, spec in specs.items():
            params = {k: v for k, v in spec.items() if k != "defense" and k not in PROXY_KEYS}
            try:
                defense = make_defense(str(spec["defense"]), secret=secret, **params)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"policy {name!r}: {error}") from None
            policies[name] = Policy(name=name, defense=defense)
        return cls(policies)

    def resolve(self, model: str) -> Policy:
        """The policy named `model`, else the default one; `UnknownModel` if neither exists."""
        policy = self._policies.get(model) if model else None
        if policy is not None:
            return policy
        if self._default is None:
            known = ", ".join(sorted(self._policies)) or "none"
            raise UnknownModel(
                f"no policy for model {model!r} and no default policy (policies: {known})"
            )
        return self._default

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._policies.values())

    def __len__(self) -> int:
        return len(self._policies)
