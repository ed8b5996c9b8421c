"""One GEMV launch for the projections that read the same input (q/k/v, gate/up) during decode.

A Llama-style block calls ``q_proj``, ``k_proj`` and ``v_proj`` (and ``gate_proj``, ``up_proj``) one
after another on the *same* hidden-state tensor. At batch 1 each 4-bit GEMV is bound by launch and
ramp latency rather than bytes (Llama-3.1-8B on an H200 in a CUDA graph: q 7.7 µs for 8 MB, k and v
4.8 µs each for 2 MB), so one launch over the group's weights is much cheaper than three.

How, without touching the model's code: the members of a group share a :class:`SiblingGroup`. The
first member called with a tensor ``x`` computes every member's output in one launch
(``ops.gemv_prepared_multi``) and parks them; a member later called with that same tensor object
(unchanged since: same version counter) takes its parked output instead of launching. Order does not
matter, and a member called with any other input runs its own GEMV, so a model that feeds the
projections different tensors stays correct (a group whose parked outputs keep going unused switches
itself off, so it never costs more than a few wasted launches).

Only the fused GEMV path takes part (1..8 tokens, inference, the prepared weight, x already in the
compute dtype); anything else (prefill, training, a swapped weight, casts) is each layer's own path.
The fused launch computes each output row with the same kernel arithmetic as the single-weight launch
(the same error bound, tests/error_bounds.py).

Under torch.compile dynamo traces this bookkeeping like any Python code: the parked outputs are graph
values, the identity test is resolved while tracing, and nothing is left parked at the end of a block
(the last member clears it), so ``fullgraph=True`` holds and a CUDA graph records one launch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from converter.loader import ops
from converter.loader.cuda_gemv import CudaGemvGroup
from converter.loader.module import QuantLinear4bit, _data_address, keyed_weight

#: Names of child modules that read the same input, in the order models call them. A group forms
#: where a module has all the names of a tuple as 4-bit children with one in_features and device.
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen, Gemma, Phi, OLMo, Mixtral, ... attention
    ("gate_proj", "up_proj"),  # their gated MLPs (dense and shared experts)
    ("query", "key", "value"),  # BERT-style encoders
)

#: Device types whose groups launch together. The CPU is left out: there each layer's own lean launch
#: (loader/cpu_gemv.py) costs less than the group's Python plus the grouped op's dispatch at SmolLM2's
#: sizes (SmolLM2-135M decode, 2 threads: 47.1 tok/s alone vs 40.8 grouped through gemv_4bit_multi).
#: Tests add "cpu" to check the logic.
FUSED_DEVICE_TYPES: set[str] = {"cuda"}

#: Parked outputs replaced before all members took theirs, after which a group stops fusing (the model
#: evidently does not feed its members one tensor).
MAX_MISSES = 2


@dataclass
class _Parked:
    x: torch.Tensor
    version: int
    outputs: list[torch.Tensor]
    taken: list[bool] = field(default_factory=list)


#: Parked outputs while dynamo traces, by ``id()`` of their group: a traced store on the group itself is
#: replayed after every compiled call (a setattr per group, 48 on a 48-layer model); this dict is empty
#: again once each block took its outputs, and dynamo replays it once.
_TRACED_PARKED: dict[int, _Parked] = {}


class SiblingGroup:
    """The shared state of 2..4 sibling 4-bit layers (see the module docstring)."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self.enabled = True
        self.misses = 0
        self._parked: _Parked | None = None
        #: The eager GPU launch of the members' prepared weights and the arguments it was made from.
        self._eager: CudaGemvGroup | None = None
        self._eager_for: tuple[ops.KernelArgs, ...] = ()

    def forward(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output for ``x`` through the group launch, or None (the member's own path)."""
        if not self.enabled or x.device.type not in FUSED_DEVICE_TYPES:
            return None
        index = member._sibling_index
        compiling = torch.compiler.is_compiling()
        parked = _TRACED_PARKED.get(id(self)) if compiling else self._parked
        if parked is not None and parked.x is x and not parked.taken[index]:
            if compiling or parked.version == x._version:
                return self._take(parked, index, member, x, compiling)
        fast = fit = None
        if not compiling and (fast := self._eager_group(x)) is not None:
            fit = fast.fits(x)
        if fit is None:
            keyed = compiling and ops.keyed_tracing()
            launch = self._traced_launch(member, x) if keyed else self._launch_args(x, compiling)
            if launch is None:
                return None
        if parked is not None and not all(parked.taken) and not compiling:
            self.misses += 1
            if self.misses >= MAX_MISSES:
                self.enabled = False
                self._parked = None
                return None
        if fit is not None:  # eager on the GPU: the prepared launch, no per-call argument building
            outputs = fast(x, fit)
        else:
            args, x2d, weights = launch
            outputs = ops.gemv_prepared_multi(x2d, args, weights)
        version = 0 if compiling else x._version
        parked = _Parked(x, version, outputs, [False] * len(self.members))
        if compiling:
            _TRACED_PARKED[id(self)] = parked
        else:
            self._parked = parked
        return self._take(parked, index, member, x, compiling)

    def _take(
        self, parked: _Parked, index: int, member: nn.Module, x: torch.Tensor, compiling: bool
    ) -> torch.Tensor:
        parked.taken[index] = True
        if all(parked.taken):  # nothing stays referenced (or, under dynamo, outlives the graph)
            if compiling:
                del _TRACED_PARKED[id(self)]
            else:
                self._parked = None
        y = parked.outputs[index]
        if member.bias is not None:
            y = y + member.bias
        return y.reshape(*x.shape[:-1], member.out_features)

    def _prepared_args(self, x: torch.Tensor, compiling: bool) -> list[ops.KernelArgs] | None:
        """The members' prepared arguments when each member would take the fused GEMV for x (inference,
        its prepared weight still holding the codes it was prepared from, x in its compute dtype, no bias
        or one of x's dtype), else None. Read without ``nn.Module.__getattr__``: an eager decode step
        asks it for every group. While tracing (torch.export) the codes are the graph's: not compared."""
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        args = []
        for m in self.members:
            weight = m._buffers.get("weight")  # None when a weight was assigned as a parameter
            a = m._kernel_args
            if (
                a is None
                or not m.use_gemv
                or weight is not m._prepared_for
                or (not compiling and _data_address(weight) != m._prepared_ptr)  # codes replaced in place
                or x.dtype != m.compute_dtype
            ):
                return None
            bias = m._parameters.get("bias")
            if bias is not None and (bias.dtype != x.dtype or bias.requires_grad):
                return None
            args.append(a)
        return args

    def _eager_group(self, x: torch.Tensor) -> CudaGemvGroup | None:
        """The members' prepared eager launch (loader/cuda_gemv.py) when :meth:`_prepared_args` holds,
        else None; made again when a member's arguments were prepared again."""
        args = self._prepared_args(x, compiling=False)
        if args is None:
            return None
        made_for = self._eager_for
        if len(made_for) != len(args) or any(a is not b for a, b in zip(args, made_for, strict=False)):
            self._eager_for = tuple(args)
            self._eager = CudaGemvGroup(args) if CudaGemvGroup.applies(args) else None
        return self._eager

    def __getstate__(self) -> dict:
        # copies and pickles make their eager launch from their own members' arguments, on first use
        return {**self.__dict__, "_eager": None, "_eager_for": (), "_parked": None}

    def forget_launch(self) -> None:
        """Drop the eager launch (a member is prepared again: moved, cast or given new codes), so that it
        keeps none of the old tensors alive; the next eager call makes it again."""
        self._eager, self._eager_for = None, ()

    def _launch_args(
        self, x: torch.Tensor, compiling: bool
    ) -> tuple[list[ops.KernelArgs], torch.Tensor, list[torch.Tensor]] | None:
        """The members' kernel arguments, x as [tokens, in_features] and the members' weights when one
        fused launch may serve this call, else None."""
        args = self._prepared_args(x, compiling)
        if args is None or x.shape[-1] != args[0].in_features:
            return None
        x2d = x.reshape(-1, args[0].in_features)
        weights = [m._prepared_for for m in self.members]  # each member's weight (_prepared_args)
        return (args, x2d, weights) if ops.multi_ok(x2d, args, weights) else None

    def _traced_launch(
        self, caller: nn.Module, x: torch.Tensor
    ) -> tuple[list[ops.KeyedLaunch], torch.Tensor, list[torch.Tensor]] | None:
        """:meth:`_launch_args` while torch.compile traces (keyed), reading what the members' own traced
        calls read (``module.keyed_weight``: key, weight and its id, use_gemv; compute dtype, bias),
        the launch's sizes as constants of the keys: dynamo guards each read before every compiled call.
        The calling member is read as itself, not as a member of the group (a second source of the same
        module costs a Python aliasing guard per call)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        keys, weights = [], []
        for i, listed in enumerate(self.members):
            m = caller if i == caller._sibling_index else listed
            if (keyed := keyed_weight(m)) is None:
                return None
            key, weight = keyed
            bias = m.bias
            if x.dtype != m.compute_dtype or (
                bias is not None and (bias.dtype != x.dtype or bias.requires_grad)
            ):
                return None
            keys.append(key)
            weights.append(weight)
        launches = [ops.keyed_launch(k) for k in keys]
        if x.shape[-1] != launches[0].in_features:
            return None
        x2d = x.reshape(-1, launches[0].in_features)
        return (launches, x2d, weights) if ops.multi_ok(x2d, launches, weights) else None


def group_siblings(model: nn.Module, names: Iterable[tuple[str, ...]] = SIBLING_NAMES) -> int:
    """Give every group of sibling 4-bit layers of ``model`` one shared :class:`SiblingGroup`.

    Returns the number of groups formed. A layer already in a group is left where it is.
    """
    count = 0
    for parent in model.modules():
        for tup in names:
            members = [getattr(parent, n, None) for n in tup]
            if not all(isinstance(m, QuantLinear4bit) for m in members):
                continue
            if any(m._siblings is not None for m in members) or not _compatible(members):
                continue
            group = SiblingGroup(members)
            for i, m in enumerate(members):
                m._siblings = group
                m._sibling_index = i
            count += 1
    return count


def ungroup_siblings(model: nn.Module) -> None:
    """Undo :func:`group_siblings`: every 4-bit layer launches alone again."""
    for m in model.modules():
        if isinstance(m, QuantLinear4bit):
            m._siblings = None


def _compatible(members: list[nn.Module]) -> bool:
    first = members[0]
    return all(
        m.in_features == first.in_features
        and m.weight.device == first.weight.device
        and m.compute_dtype == first.compute_dtype
        for m in members
    )
