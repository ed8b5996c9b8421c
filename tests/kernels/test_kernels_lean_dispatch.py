"""The lean AutogradCPU route of the custom ops (converter/kernels/lean_dispatch.py).

A plain CPU call that needs no gradient runs the op's CPU implementation straight from the dispatcher;
every other call (a tensor that requires grad, fake tensors while tracing) takes custom_op's own
Autograd kernel, so behaviour is unchanged: the same outputs, the same "no autograd formula" error on
backward, fake implementations while tracing.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import codebook_tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from converter.kernels import bnb4bit as kernels
from converter.kernels import custom_ops, lean_dispatch
from converter.kernels import gemv_bf16 as gemv_bf16_module
from formats.quant_types import QuantType

OPS = ("gemv_4bit", "gemv_4bit_multi", "dequantize_4bit", "dequantize_nested", "gemv_bf16")
OUT, K, BS = 40, 128, 64


def _weight() -> tuple:
    """gemv_4bit's per-weight arguments: packed, absmax, codes, nested_absmax, nested_map, offset, qmap."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(OUT, K, generator=g) * 0.05).to(torch.bfloat16)
    packed, absmax = kernels.quantize_4bit(w, blocksize=BS, quant_type=QuantType.NF4)
    return packed, absmax, None, None, None, 0.0, codebook_tensor(QuantType.NF4)


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_the_lean_cpu_kernel_and_keeps_its_autograd_kernel(name: str) -> None:
    qualname = f"{custom_ops.NAMESPACE}::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "AutogradCPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")  # CUDA etc.: custom_op's


def test_plain_call_equals_the_implementation_and_grad_still_has_no_formula() -> None:
    args = _weight()
    x = torch.randn(2, K).to(torch.bfloat16)
    impl = custom_ops.IMPLS["cpu"]["gemv_4bit"]
    with torch.no_grad():
        assert torch.equal(torch.ops.quantize_model.gemv_4bit(x, *args, OUT, BS), impl(x, *args, OUT, BS))
    xg = x.clone().requires_grad_()
    y = torch.ops.quantize_model.gemv_4bit(xg, *args, OUT, BS)  # custom_op's Autograd kernel
    assert y.requires_grad
    assert torch.equal(y.detach(), impl(x, *args, OUT, BS))
    with pytest.raises(RuntimeError, match="no autograd formula"):
        y.sum().backward()
    w = torch.randn(OUT, K).to(torch.bfloat16).requires_grad_()  # any tensor argument counts
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.ops.quantize_model.gemv_bf16(x, w).sum().backward()


def test_fake_tensors_get_the_fake_implementation() -> None:
    args = _weight()
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        y = torch.ops.quantize_model.gemv_4bit(torch.empty(3, K, dtype=torch.float16), *fake_args, OUT, BS)
    assert y.shape == (3, OUT)
    assert y.dtype == torch.float16


def test_route_taken_per_call(monkeypatch) -> None:
    """On a scratch op: plain calls skip the general kernel; grad, fake tensors and inference mode do not
    reach the lean kernel's direct call (the last skips AutogradCPU altogether)."""
    general_calls: list[str] = []
    cpu_calls: list[int] = []
    real = lean_dispatch._general_autograd_kernel

    def counting(op):
        kernel = real(op)
        return lambda keyset, *a: general_calls.append(str(keyset)) or kernel(keyset, *a)

    monkeypatch.setattr(lean_dispatch, "_general_autograd_kernel", counting)

    def double(x: torch.Tensor) -> torch.Tensor:
        cpu_calls.append(1)
        return x * 2

    op = torch.library.custom_op("qm_lean_test::double", double, mutates_args=(), device_types="cpu")
    op.register_fake(lambda x: torch.empty_like(x))
    assert lean_dispatch.register_lean_cpu(op, double)
    x = torch.ones(3)
    assert torch.equal(torch.ops.qm_lean_test.double(x), x * 2)
    with torch.no_grad():
        torch.ops.qm_lean_test.double(x.requires_grad_())
    assert (len(cpu_calls), general_calls) == (2, [])
    torch.ops.qm_lean_test.double(x)  # requires grad, grad mode on
    assert len(general_calls) == 1
    assert len(cpu_calls) == 3
    with FakeTensorMode():
        torch.ops.qm_lean_test.double(torch.ones(3))
    assert len(general_calls) == 2
    assert "Python" in general_calls[-1]
    assert len(cpu_calls) == 3
    with torch.inference_mode():
        torch.ops.qm_lean_test.double(torch.ones(3))  # no autograd key: custom_op's CPU kernel
    assert len(general_calls) == 2
    assert len(cpu_calls) == 4


def test_gemv_bf16_op_through_the_lean_route_equals_the_function() -> None:
    x = torch.randn(1, K).to(torch.bfloat16)
    w = torch.randn(OUT, K).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(torch.ops.quantize_model.gemv_bf16(x, w), gemv_bf16_module.gemv_bf16(x, w))
