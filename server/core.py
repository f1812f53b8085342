"""The protect core: one protocol-free path from rows to protected rows, behind every
front end (the `Defense` servicer, the proxy's TorchServe and v2 adapters, the model
server, and any new one such as Envoy ext_proc).

    answer = await core.protect(rows, "mnist", principal="shop", logits=False)
    answer.rows, answer.policy          # protected 2-D array, name of the policy applied

`protect` does, in order:

1. refuse while the server is not serving (`core.refuse(reason)`: `Unavailable`);
2. resolve the policy by name (`policies.resolve`; `NotFound` when there is none);
3. check the rows: a 2-D array, at most `max_rows` of them (`InvalidInput`, `Exhausted`);
4. ask the limiter: `await limiter.admit(principal, rows)`; it refuses by raising
   `Exhausted` (with `retry_after` seconds and `quota` details when it knows them);
5. ask the escalation, if any, which policy this principal gets instead
   (`escalation.policy_for(principal, policy)`; it refuses by raising `Exhausted`);
6. perturb with the policy (a defense in process, or a remote sidecar call for the model
   server); the policy raises `InvalidInput` for rows that are not probabilities;
7. tell every observer what was asked and answered (`Exchange`), refusals included.

Errors are the domain exceptions of `stealguard.server.errors`; the front end maps their
kind to its protocol once. Anything else that escapes is a bug (INTERNAL).

**Plugging in.** The three hooks are small on purpose:

- A *limiter* (rate limits, quotas, per-principal metering) is any object with
  ``async def admit(self, principal: str, rows: int) -> None`` that returns to admit and
  raises ``Exhausted(message, retry_after=..., quota={...})`` to refuse. It is awaited on
  the event loop of the front end, so it may do I/O (Redis, Valkey) but must not block.
  `stealguard.server.metering.Meter` is the one the servers use (`--rate-limit`,
  `--quota`, in rows, on a memory or Redis/Valkey store).
- An *observer* (Prometheus metrics, metering records, detectors) is any object with
  ``def observe(self, exchange: Exchange) -> None``, called once per `protect` call that
  got past step 2, after the answer or the refusal. It runs inline, so it must be quick;
  one that needs I/O schedules it (``asyncio.get_running_loop().create_task``) and returns.
  An observer that raises does not change the answer; its error is logged.
- An *escalation* (`stealguard.server.detection.Ladder`, fed by the detectors of the
  front end that sees the inputs) is any object with
  ``def policy_for(self, principal: str, policy: Policy) -> Policy``: the policy to
  answer this principal with (the one given, a stronger one, labels only), or a refusal
  (`Exhausted`). It runs inline, so it must be quick. If it fails any other way, the
  configured policy answers and the error is logged: never a weaker answer.

The core imports numpy only: no grpc, no numba (the policies bring the defenses).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
from stealguard.server.errors import Exhausted, InvalidInput, ProtectError, Unavailable

log = logging.getLogger("stealguard.core")

#: The principal of a caller nothing identifies.
ANONYMOUS = "anonymous"


class Policy(Protocol):
    """What the core needs of a policy: a name and a way to perturb rows."""

    name: str

    def perturb(self, rows: np.ndarray, logits: bool) -> np.ndarray | Awaitable[np.ndarray]:
        """The protected copy of the 2-D `rows`; `InvalidInput` when they are not valid."""


class Policies(Protocol):
    """Finds the policy for a name ("" or an unknown name: the default, if any)."""

    def resolve(self, name: str) -> Policy:
        """The policy for `name`; raises `NotFound` when there is none."""


class Limiter(Protocol):
    """Admits or refuses a principal's rows (see the module docstring)."""

    async def admit(self, principal: str, rows: int) -> None:
        """Return to admit; raise `Exhausted` to refuse."""


@dataclass(slots=True)
class Exchange:
    """One `protect` call as observers see it.

    `given` is the rows as asked (2-D), `returned` the rows answered (None when refused,
    then `error` says why; `limited` when the limiter refused). `rows_in`/`rows_out` are
    their row counts.
    """

    principal: str
    policy: str
    logits: bool
    given: np.ndarray
    returned: np.ndarray | None = None
    error: BaseException | None = None
    limited: bool = False  # the limiter refused it

    @property
    def rows_in(self) -> int:
        return len(self.given)

    @property
    def rows_out(self) -> int:
        return 0 if self.returned is None else len(self.returned)


class Escalation(Protocol):
    """Chooses a principal's policy after a detector's alarms (see the module docstring)."""

    def policy_for(self, principal: str, policy: Policy) -> Policy:
        """The policy for `principal` instead of `policy`; raise `Exhausted` to refuse."""


class Observer(Protocol):
    """Told about every `protect` call (see the module docstring)."""

    def observe(self, exchange: Exchange) -> None: ...


class Answer(NamedTuple):
    """The protected rows and the name of the policy that protected them."""

    rows: np.ndarray
    policy: str


class ProtectCore:
    """Validates, resolves, limits, perturbs and observes (see the module docstring).

    `policies` may be replaced whole at any time (SIGHUP reload); each call reads it once.
    """

    def __init__(self, policies: Policies, *, max_rows: int | None = None,
                 limiter: Limiter | None = None, observers: Iterable[Observer] = (),
                 escalation: Escalation | None = None):
        self.policies = policies
        self.max_rows = max_rows
        self.limiter = limiter
        self.observers = list(observers)
        self.escalation = escalation
        #: Why calls are refused (warming up, draining), or None while serving.
        self.unavailable: str | None = None

    @property
    def needs_principal(self) -> bool:
        """Whether a limiter or observer will look at the principal (front ends may skip
        identifying the caller when nothing will)."""
        return self.limiter is not None or bool(self.observers) \
            or self.escalation is not None

    def refuse(self, reason: str) -> None:
        """Refuse every call from now on with `Unavailable(reason)`."""
        self.unavailable = reason

    def open(self) -> None:
        """Serve calls again."""
        self.unavailable = None

    def resolve(self, name: str) -> Policy:
        """The policy `protect` would use for `name` now: `Unavailable` while refusing,
        `NotFound` without one. Front ends that must know it before they have rows (the
        proxy, before it forwards a call upstream) call this first."""
        if self.unavailable is not None:
            raise Unavailable(self.unavailable)
        return self.policies.resolve(name)

    async def protect(self, rows: np.ndarray, policy: str | Policy = "",
                      principal: str = ANONYMOUS, *, logits: bool = False,
                      charged: bool = False) -> Answer:
        """Protect the 2-D `rows` with the policy named `policy` for `principal`.

        `charged`: a trusted front end before this one has charged the rows to `principal`
        under its own limits (the model server's sidecar call): the limiter is skipped,
        so a query is charged once. The front end decides whom to believe.

        `policy` may also be a `Policy` the front end resolved itself (the model server's
        handler, bound to the caller's deadline). Raises `Unavailable`, `NotFound`,
        `InvalidInput` or `Exhausted` (see the module docstring); any other exception is a
        bug.
        """
        if isinstance(policy, str):
            chosen = self.resolve(policy)
        elif self.unavailable is not None:
            raise Unavailable(self.unavailable)
        else:
            chosen = policy
        exchange = Exchange(principal, chosen.name, logits, rows) if self.observers else None
        try:
            if rows.ndim != 2:
                raise InvalidInput(f"rows must be 2-D (rows, classes), got shape {rows.shape}")
            if self.max_rows is not None and len(rows) > self.max_rows:
                raise Exhausted(f"{len(rows)} rows: at most {self.max_rows} per request; "
                                "split the batch")
            if self.limiter is not None and not charged:
                try:
                    await self.limiter.admit(principal, len(rows))
                except Exhausted:
                    if exchange is not None:
                        exchange.limited = True
                    raise
            applied = chosen if self.escalation is None else self._escalated(principal, chosen)
            returned = applied.perturb(rows, logits)
            if returned.__class__ is not np.ndarray and inspect.isawaitable(returned):
                returned = await returned  # a remote policy (the model server's sidecar call)
        except BaseException as error:
            if exchange is not None:
                exchange.error = error
                self._tell(exchange)
            raise
        if exchange is not None:
            exchange.returned = returned
            self._tell(exchange)
        return Answer(returned, applied.name)

    def _escalated(self, principal: str, chosen: Policy) -> Policy:
        try:
            return self.escalation.policy_for(principal, chosen)
        except ProtectError:
            raise  # a refusal
        except Exception:  # noqa: BLE001 - a failing escalation keeps the configured policy
            log.exception("escalation %r failed for principal %r: keeping policy %r",
                          self.escalation, principal, chosen.name)
            return chosen

    def _tell(self, exchange: Exchange) -> None:
        for observer in self.observers:
            try:
                observer.observe(exchange)
            except Exception:  # noqa: BLE001 - an observer must not change the answer
                log.exception("observer %r failed", observer)

