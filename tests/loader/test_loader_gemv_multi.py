"""The loader's several-weights GEMV (ops.multi_ok / ops.gemv_prepared_multi: q/k/v, gate/up in one launch).

On CPU each output equals ops.gemv_prepared of its weight bit for bit (csrc/gemv_cpu.cpp runs every row
exactly as the one-weight kernel does); under torch.compile the call is one custom-op node
(``quantize_model::gemv_4bit_multi_keyed``: the layers' small tensors by key) with no graph break.
"""

from __future__ import annotations

import torch
from loader_helpers import assert_compiled_without_breaks, make_layer

from converter.loader import ops

K, BS = 512, 64


_LAYERS: list = []  # the layers live as long as the tests: a compiled graph reads their registered tensors


def _args(outs=(64, 16, 16), nested=True):
    layers = [make_layer(o, K, nested=nested, blocksize=BS, seed=o)[0] for o in outs]
    _LAYERS.extend(layers)
    return [layer._kernel_args for layer in layers]


def test_gemv_prepared_multi_equals_gemv_prepared_of_each_weight():
    for nested in (False, True):
        args = _args(nested=nested)
        for batch in (1, 4, 8):
            x = torch.randn(batch, K, dtype=torch.bfloat16)
            assert ops.multi_ok(x, args)
            ys = ops.gemv_prepared_multi(x, args)
            assert [y.shape for y in ys] == [(batch, a.out_features) for a in args]
            for y, a in zip(ys, args, strict=True):
                assert torch.equal(y, ops.gemv_prepared(x, a))


def test_multi_ok_refuses_what_one_launch_cannot_take():
    args = _args()
    x = torch.randn(1, K, dtype=torch.bfloat16)
    assert not ops.multi_ok(x, args[:1])  # one weight: the plain GEMV
    assert not ops.multi_ok(x, args + args[:2])  # five weights
    assert not ops.multi_ok(torch.randn(9, K, dtype=torch.bfloat16), args)  # more than GEMV_MAX_TOKENS
    assert not ops.multi_ok(torch.randn(1, 2 * K), args)  # x of another K
    wide = make_layer(16, 2 * K, nested=True, blocksize=BS)[0]._kernel_args
    assert not ops.multi_ok(torch.randn(1, K), [args[0], wide])  # another in_features
    other_bs = make_layer(16, K, nested=True, blocksize=128)[0]._kernel_args
    assert not ops.multi_ok(x, [args[0], other_bs])  # another blocksize
    assert not ops.multi_ok(x, [args[0], args[1]._replace(impls=None)])  # the torch path
    assert not ops.multi_ok(x.to("meta"), args)  # another device


def test_compiles_fullgraph_with_one_op_node(dynamo):
    args = _args(outs=(64, 16, 32))

    def qkv(x):
        q, k, v = ops.gemv_prepared_multi(x, args)
        return q.sum(-1) + k.sum(-1) + v.sum(-1), q, k, v

    x = torch.randn(3, K, dtype=torch.bfloat16)
    eager = qkv(x)
    compiled = torch.compile(qkv, fullgraph=True, backend="aot_eager")(x)
    assert_compiled_without_breaks(dynamo)
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)  # the same kernel, the same ATen sums: the same bits
