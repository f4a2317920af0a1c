"""TEST-ONLY fault injection for the model thread. Never set this in production.

The tests need the model to fail on purpose (an exception mid-session, a CUDA out-of-memory,
a model that stays broken) to check what users and operators see. Set ``JMOSHI_FAULT_INJECT``
to a comma-separated list of ``KIND@STEP``; STEP counts model steps after start-up warm-up,
across sessions, starting at 1:

* ``error@N``: step N raises RuntimeError, once.
* ``oom@N``: step N raises ``torch.cuda.OutOfMemoryError``, once (works on CPU too).
* ``dead@N``: step N and every later step raise: the model is unusable from then on.

The variable is read once when the engine starts; the engine logs a warning when it is set.
It is not a Config field on purpose: no flag, not in ``--help``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

ENV = "JMOSHI_FAULT_INJECT"
KINDS = ("error", "oom", "dead")


class InjectedFault(RuntimeError):
    """The exception ``error@N`` and ``dead@N`` raise."""


class FaultInjector:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.steps = 0
        self._faults: list[tuple[str, int]] = []
        for raw in spec.split(","):
            item = raw.strip()
            if not item:
                continue
            kind, sep, at = item.partition("@")
            if not sep or kind not in KINDS or not at.isdigit() or int(at) < 1:
                raise ValueError(f"{ENV}: {item!r} is not KIND@STEP with KIND in {KINDS} and STEP >= 1")
            self._faults.append((kind, int(at)))

    def before_step(self) -> None:
        """Called by the model thread before each step; raises when a fault is due."""
        self.steps += 1
        for kind, at in self._faults:
            if kind == "dead" and self.steps >= at:
                raise InjectedFault(f"injected fault: dead@{at} (step {self.steps})")
            if self.steps == at:
                if kind == "oom":
                    raise torch.cuda.OutOfMemoryError(f"injected fault: oom@{at}")
                raise InjectedFault(f"injected fault: error@{at}")


def from_env(env: Mapping[str, str] | None = None) -> FaultInjector | None:
    spec = (os.environ if env is None else env).get(ENV, "")
    return FaultInjector(spec) if spec.strip() else None
