"""One dispatch mechanism for every op: rules as data, first match wins.

An op describes each call by a :class:`Problem` (a frozen dataclass: device type, compute capability,
dtype, interpreter flag, plus the op's own size fields), lists its :class:`Backend` s and a table of
:class:`Rule` s, and asks a :class:`Dispatcher` for the backend that runs the call:

* a rule matches when every condition it sets holds: ``device``, arch ``families``, ``dtypes``,
  ``interpret`` and ``when`` (op fields: a tuple of allowed values, or :func:`between` for a range);
* of the matching rules, the first whose backend accepts the problem wins. A backend states why it
  does not take one (:meth:`Backend.reasons`, like xformers' ``not_supported_reasons``), so a
  declined rule is visible in :meth:`Dispatcher.explain` instead of silently skipped;
* a backend that declines only because a package is missing (``requires``) stops the search with an
  error naming the package: the table chose it, and a silent fallback would hide a broken install;
* :meth:`Dispatcher.force` runs every call inside a ``with`` block on one backend (tests, benchmarks);
  a forced backend that declines the problem is an error listing its reasons;
* decisions are cached per problem (rules are data, so ``dispatcher.rules = ...`` clears the cache);
  ops keep per-signature plans derived from a decision in ``dispatcher.plans`` (cleared with it).

The decision is taken inside the registered ops (eager and compiled calls alike) and in their fake
kernels, from shapes, dtypes and devices only, so eager, ``torch.compile`` and ``opcheck`` run the same
backend for the same inputs.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional, Sequence

from . import _arch


@dataclasses.dataclass(frozen=True)
class Problem:
    """What dispatch sees of a call. Ops subclass it with their own fields (sizes, layout flags)."""
    device: str          # "cpu" | "cuda" | ...
    cc: int              # compute capability (see _arch.capability); 0 on a plain CPU call
    dtype: Any
    interpret: bool      # TRITON_INTERPRET=1


@dataclasses.dataclass(frozen=True)
class between:
    """Condition on an op field: ``lo <= value <= hi`` (None: unbounded)."""
    lo: Optional[int] = None
    hi: Optional[int] = None

    def __contains__(self, value) -> bool:
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

    def __str__(self) -> str:
        if self.hi is None:
            return f">= {self.lo}"
        return f"<= {self.hi}" if self.lo is None else f"in [{self.lo}, {self.hi}]"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a dispatch table. Unset conditions match anything."""
    backend: str
    why: str                              # what the row is for and the measurement (or reasoning) behind it
    device: str = ""
    families: tuple = ()                  # arch families (_arch.family: 75, 80, 90) of CUDA devices
    dtypes: tuple = ()
    interpret: Optional[bool] = None
    when: tuple = ()                      # ((op field, tuple of values | between), ...)

    def mismatch(self, p: Problem) -> Optional[str]:
        """Why this row does not apply to ``p`` (None when it does)."""
        if self.device and p.device != self.device:
            return f"device {p.device} is not {self.device}"
        if self.interpret is not None and p.interpret != self.interpret:
            return "TRITON_INTERPRET=1 is " + ("not set" if self.interpret else "set")
        if self.families and _arch.family(p.cc) not in self.families:
            return f"arch family sm_{_arch.family(p.cc)} not in {['sm_%d' % f for f in self.families]}"
        if self.dtypes and p.dtype not in self.dtypes:
            return f"dtype {p.dtype} not in {[str(d) for d in self.dtypes]}"
        for field, cond in self.when:
            value = getattr(p, field)
            if value not in cond:
                return f"{field}={value} not {cond}" if isinstance(cond, between) else f"{field}={value} not in {cond}"
        return None


class Backend:
    """An implementation an op can run. ``reasons(p)`` lists why it cannot take problem ``p`` (empty:
    it can); ``plan(p)`` returns what the implementation needs to know (tiles, ...) or None.
    ``requires`` names a package the backend imports lazily; ``missing()`` says why it is unavailable."""
    name: str = ""
    requires: Optional[str] = None

    def reasons(self, p: Problem) -> list[str]:
        return []

    def plan(self, p: Problem) -> Any:
        return None

    def missing(self) -> Optional[str]:
        return None


class TritonBackend(Backend):
    """The Triton kernels of op ``op`` (``stssa_kernels.triton.<op>``): CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``; fp16/bf16/fp32. Ops add their own reasons (tiles, head dims) on top."""
    name, requires = "triton", "triton"

    def __init__(self, op: str):
        self.op = op

    def missing(self) -> Optional[str]:
        return _arch.triton_missing(self.op)

    def reasons(self, p: Problem) -> list[str]:
        import torch  # the dtypes only; this module stays importable without building anything

        out = []
        if p.device != "cuda" and not (p.device == "cpu" and p.interpret):
            out.append("runs on CUDA tensors, or CPU tensors under TRITON_INTERPRET=1")
        if p.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            out.append(f"the kernels take fp16/bf16/fp32, not {p.dtype}")
        return out


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str
    rule: Optional[int]        # index of the rule that chose it (None: forced)
    why: str
    plan: Any = None

    def describe(self) -> str:
        head = f"rule {self.rule}" if self.rule is not None else "forced"
        detail = self.plan.describe() if hasattr(self.plan, "describe") else self.backend
        return f"{head} ({self.why}): {detail}"


class Dispatcher:
    def __init__(self, op: str, backends: Sequence[Backend], rules: Sequence[Rule]):
        self.op = op
        self.backends = {b.name: b for b in backends}
        self._forced: Optional[str] = None
        self._cache: dict = {}
        #: per-signature plans an op derives from a choice (layouts, offsets), cleared with the cache
        self.plans: dict = {}
        self.rules = tuple(rules)

    @property
    def rules(self) -> tuple:
        return self._rules

    @rules.setter
    def rules(self, rules: Sequence[Rule]) -> None:
        for r in rules:
            if r.backend not in self.backends:
                raise ValueError(f"{self.op}: rule names unknown backend {r.backend!r}; known: {list(self.backends)}")
        if not rules or rules[-1].backend not in self.backends or any(
                (rules[-1].device, rules[-1].families, rules[-1].dtypes, rules[-1].interpret, rules[-1].when)):
            raise ValueError(f"{self.op}: the last rule must be an unconditional catch-all")
        self._rules = tuple(rules)
        self._cache.clear()
        self.plans.clear()

    def _declines(self, b: Backend, p: Problem) -> list[str]:
        why = b.missing()
        return ([f"needs {b.requires}: {why}"] if why else []) + b.reasons(p)

    def select(self, p: Problem) -> Choice:
        """The backend that runs ``p``: the forced one, else the first matching rule's that accepts it."""
        if self._forced is not None:
            return self._forced_choice(p)
        try:
            c = self._cache.get(p)
        except TypeError:  # symbolic sizes
            return self._select(p)
        if c is None:
            c = self._cache[p] = self._select(p)
        return c

    def select_cached(self, key, make_problem, forced: Optional[str] = None) -> Choice:
        """:meth:`select` for the problem ``make_problem()`` describes, cached under ``key`` (a cheap
        hashable summary of the call, so a repeated eager call skips building the problem). Keys holding
        symbolic sizes (torch.compile with dynamic shapes) are not hashable and go uncached. ``forced``:
        this backend, as if inside ``force(forced)`` (a backward running the forward's forced backend)."""
        if forced is not None:
            return self._forced_choice(make_problem(), forced)
        if self._forced is not None:
            return self._forced_choice(make_problem())
        try:
            c = self._cache.get(key)
        except TypeError:
            return self._select(make_problem())
        if c is None:
            c = self._cache[key] = self.select(make_problem())
        return c

    def _select(self, p: Problem) -> Choice:
        for i, r in enumerate(self._rules):
            if r.mismatch(p) is not None:
                continue
            b = self.backends[r.backend]
            why = b.missing()
            if why is not None:
                raise RuntimeError(f"{self.op}: dispatch rule {i} ({r.why}) runs this call on the {b.name!r} "
                                   f"backend, which needs {b.requires}: {why}")
            if not b.reasons(p):
                return Choice(b.name, i, r.why, b.plan(p))
        raise AssertionError(f"{self.op}: the catch-all rule's backend declined {p}")

    def _forced_choice(self, p: Problem, name: Optional[str] = None) -> Choice:
        b = self.backends[name or self._forced]
        reasons = self._declines(b, p)
        if reasons:
            raise RuntimeError(f"{self.op}: forced backend {b.name!r} does not take this call: " + "; ".join(reasons))
        return Choice(b.name, None, f"forced with {self.op} dispatch force({b.name!r})", b.plan(p))

    @property
    def forced(self) -> Optional[str]:
        """The backend forced by the innermost :meth:`force` block (None: the table decides)."""
        return self._forced

    @contextlib.contextmanager
    def force(self, name: Optional[str]) -> Iterator[None]:
        """Run every call inside the block on backend ``name`` (None: the table). Read when the op runs,
        so it also applies to compiled graphs."""
        if name is not None and name not in self.backends:
            raise ValueError(f"{self.op}: unknown backend {name!r}; expected one of {list(self.backends)}")
        prev, self._forced = self._forced, name
        try:
            yield
        finally:
            self._forced = prev

    def explain(self, p: Problem) -> str:
        """Every rule with whether it applies and, if so, whether its backend accepts ``p``; then the choice."""
        lines = [f"{self.op} dispatch for {p}:"]
        for i, r in enumerate(self._rules):
            miss = r.mismatch(p)
            if miss is not None:
                lines.append(f"  rule {i} [{r.backend}] skipped: {miss}")
                continue
            reasons = self._declines(self.backends[r.backend], p)
            lines.append(f"  rule {i} [{r.backend}] " + ("declined: " + "; ".join(reasons) if reasons else "TAKES IT"))
        try:
            lines.append("  -> " + self.select(p).describe())
        except RuntimeError as e:
            lines.append(f"  -> error: {e}")
        return "\n".join(lines)


def reason_if(cond: bool, text: str, out: list) -> None:
    """Append ``text`` to the reasons list ``out`` when ``cond`` holds (keeps backends' reasons flat)."""
    if cond:
        out.append(text)


__all__ = ["Problem", "Rule", "Backend", "Choice", "Dispatcher", "between", "reason_if"]


_fwad = None


def refuse_forward_ad(op: str, *tensors) -> None:
    """A clear error where forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) meets an op
    with no forward formula: PyTorch would treat the op as a constant and return zero tangents."""
    global _fwad
    if _fwad is None:  # imported once (this module imports torch lazily)
        import torch.autograd.forward_ad
        _fwad = torch.autograd.forward_ad
    if _fwad._current_level < 0:  # no dual level open (torch.func.jvp opens one too): the common case, ~50 ns
        return
    for t in tensors:
        if t is not None and _fwad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(f"{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not "
                                      "implemented: its tangents would be silently zero; use reverse mode "
                                      "(backward, torch.func.grad / vjp) or the reference in stssa_kernels.reference")


def no_autocast(device_type: str):
    """A context with autocast off on ``device_type`` when it is on, else a no-op: a backward called inside
    an autocast region (``loss.backward()`` under ``torch.autocast``) runs the ops' kernels in the dtypes
    their forward chose, as PyTorch's own backward ops do, instead of autocasting their inner matmuls."""
    import contextlib

    import torch

    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def register_op_pair(forward_schema: str, backward_schema: str, forward_kernel, backward_kernel, forward_fake,
                     backward_fake):
    """Define an op and its backward op in the ``stssa`` namespace: one Python kernel each for CPU and
    CUDA (the backend is chosen inside it, see above) and a fake kernel each. Returns ``(library,
    forward OpOverload, backward OpOverload)``; the caller keeps the library alive."""
    import torch

    lib = torch.library.Library("stssa", "FRAGMENT")  # noqa: TOR901
    ops = []
    for schema, kernel, fake in ((forward_schema, forward_kernel, forward_fake),
                                 (backward_schema, backward_kernel, backward_fake)):
        name = schema.split("(", 1)[0]
        lib.define(schema)
        for key in ("CPU", "CUDA"):
            lib.impl(name, kernel, key)
        torch.library.register_fake(f"stssa::{name}", fake, lib=lib)
        ops.append(getattr(torch.ops.stssa, name).default)
    return lib, ops[0], ops[1]
