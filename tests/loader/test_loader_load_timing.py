"""The load's opt-in phase breakdown (converter.loader.timing) and the CUDA warm-up's work
(converter.loader.warmup), exercised on the CPU.

The breakdown is what a GPU run of ``bench/bench_generate.py --load --load-breakdown`` reports: it must
name every phase of a streamed load, with and without verify, print nothing when off, and never change
the model. The warm-up runs on a CUDA load only; here its thread runs against CPU tensors, so that
every layer kind of a checkpoint and the one-layer model it builds are checked to run without error
(on a GPU a failure would only be swallowed: the warm-up is best effort).
"""

from __future__ import annotations

import gc
import sys
import threading
from pathlib import Path

import pytest
import torch

from converter import load_quantized
from converter.loader import cuda_context, gil, stream, timing, warmup
from converter.loader import model as model_mod
from converter.loader import state as state_mod
from converter.loader.state import shard_files
from formats.reader import open_checkpoint

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


@pytest.fixture
def streamed_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_quantized(device="cpu") takes the device path (stream into fresh CPU tensors)."""
    monkeypatch.setattr(state_mod, "streams_to", lambda device: True)
    monkeypatch.setattr(model_mod, "streams_to", lambda device: True)


@pytest.mark.parametrize("verify", [False, True], ids=["verify-off", "verify-on"])
def test_the_breakdown_names_every_phase_of_a_streamed_load(
    chunked_folder: Path,
    streamed_on_cpu: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    verify: bool,
) -> None:
    monkeypatch.setenv(timing.ENV, "1")
    timed = load_quantized(chunked_folder, verify=verify)
    err = capsys.readouterr().err
    assert err.count(timing.PREFIX) == 1, "one line per load"
    phases = timing.parse(err)
    assert phases is not None
    wanted = {"open", "reserve", "alloc", "staging_cpu", "stream", "read_cpu", "read_wait", "copy_issue_cpu"}
    wanted |= {"skeleton", "fill", "chunks", "reads_start_at", "copies_done_at", "built_at", "total"}
    if verify:
        wanted |= {"verify_start", "verify_wait"}
    assert wanted <= phases.keys()
    assert all(v >= 0 for v in phases.values())
    # The caller's phases happen one after the other inside the call: their sum cannot exceed it.
    assert phases["open"] + phases["stream"] + phases["skeleton"] + phases["fill"] <= phases["total"]
    assert phases["reads_start_at"] <= phases["copies_done_at"] <= phases["built_at"] <= phases["total"]
    # 4 KiB chunk digests: every chunk of every shard is read (and, with verify, hashed by a reader
    # unless the verification's own threads took it first).
    assert phases["chunks"] >= len(shard_files(chunked_folder)[0])
    if verify:  # each chunk hashed once: by the reader that read it or by a verification thread
        assert phases.get("hashed_by_pool", 0) + phases.get("hashed_by_caller", 0) == phases["chunks"]
        assert phases.get("hashed_by_readers", 0) == phases.get("hashed_by_caller", 0)

    monkeypatch.delenv(timing.ENV)
    plain = load_quantized(chunked_folder, verify=verify)
    assert timing.PREFIX not in capsys.readouterr().err, "off by default"
    with torch.no_grad():
        assert torch.equal(timed(IDS).logits, plain(IDS).logits)


def test_a_failed_load_still_prints_its_line_and_leaves_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv(timing.ENV, "1")
    with pytest.raises(Exception, match="no-such-folder"):
        load_quantized(tmp_path / "no-such-folder")
    assert timing.parse(capsys.readouterr().err) is not None
    assert not timing.active()


def test_timing_hooks_do_nothing_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(timing.ENV, raising=False)
    with timing.timed_load() as timer, timing.phase("x"):
        timing.add("y", 1.0)
        timing.mark("z")
    assert timer is None
    assert not timing.active()


def test_reserve_device_memory_is_cuda_only() -> None:
    assert not stream.reserve_device_memory(torch.device("cpu"), [64 << 20])


@pytest.mark.parametrize("mode", ["kernels", "model"])
def test_the_warmup_runs_every_layer_kind_and_the_rest_of_a_forward(our_folder: Path, mode: str) -> None:
    state = open_checkpoint(shard_files(our_folder)[0]).records()
    kinds = {warmup._kind(v) for v in state.values() if not isinstance(v, torch.Tensor)}
    assert 1 < len(kinds) <= warmup.MAX_KINDS  # q/o, k/v, gate/up, down of the tiny Llama
    calls: list[tuple] = []
    ran: list[bool] = []
    grouped: list[tuple[tuple[str, ...], bool]] = []
    ops: list[int] = []
    real_layer, real_model, real_group = warmup.Warmup._layer, warmup.Warmup._tiny_model, warmup.Warmup._group
    real_ops = warmup._forward_ops

    def layer(self, record, compute):
        calls.append(warmup._kind(record))
        real_layer(self, record, compute)

    warm = warmup.Warmup(torch.device("cpu"), our_folder, torch.bfloat16, mode)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(warmup.Warmup, "_layer", layer)
        mp.setattr(warmup.Warmup, "_tiny_model", lambda self, c: ran.append(real_model(self, c)))
        mp.setattr(warmup, "_forward_ops", lambda *a: ops.append(real_ops(*a)))
        mp.setattr(
            warmup.Warmup, "_group", lambda self, r, c: grouped.append((tuple(r), real_group(self, r, c)))
        )
        warm.start(state)
        warm.join()
    assert warm.error is None
    assert sorted(calls) == sorted(kinds), "each layer kind once"
    if mode == "model":
        assert (ran, ops) == ([True], []), "the one-layer Llama was built and called"
    else:  # the kernel families at 4 tokens and at 1, with the folder's widths; no model built
        assert (ran, ops) == ([], [2])
    # The sibling groups load_quantized forms (loader/siblings.py), formed here too and called.
    assert grouped == [(("q_proj", "k_proj", "v_proj"), True), (("gate_proj", "up_proj"), True)]
    # the warm-up and its library threads (kernels mode) joined before join() returned
    assert not any(t.name.startswith("qm-cuda-") for t in threading.enumerate())


def test_the_warmup_is_off_for_the_cpu_and_when_turned_off(
    our_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(warmup.ENV, "1")
    with warmup.warmed("cpu", our_folder, torch.bfloat16) as warm:
        assert warm is None
    monkeypatch.delenv(warmup.ENV)
    assert warmup.mode() == "kernels"  # on by default: the kernel families, no model built
    for value, want in (("1", "kernels"), ("model", "model"), ("0", "off"), ("no", "off")):
        monkeypatch.setenv(warmup.ENV, value)
        assert warmup.mode() == want
    assert not warmup.enabled(torch.device("cuda"))


def test_a_failing_warmup_never_fails_the_load(our_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, record, compute):
        msg = "boom"
        raise RuntimeError(msg)

    monkeypatch.setattr(warmup.Warmup, "_layer", broken)
    state = open_checkpoint(shard_files(our_folder)[0]).records()
    warm = warmup.Warmup(torch.device("cpu"), our_folder, torch.bfloat16)
    warm.start(state)
    warm.join()
    assert warm.error == "RuntimeError: boom"


def test_a_load_with_the_warmup_beside_it_leaves_no_global_state_changed(
    our_folder: Path, streamed_on_cpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The warm-up thread (here on CPU tensors) builds a model while the caller builds the skeleton:
    # both patch process-wide state (transformers' no_init_weights, the meta-parameter hook), which
    # BUILD_LOCK serializes, and neither may leave the default dtype changed.
    from transformers import PreTrainedModel

    register, normal = torch.nn.Module.register_parameter, torch.nn.init.normal_
    init_weights = PreTrainedModel.init_weights
    plain = load_quantized(our_folder)
    monkeypatch.setattr(warmup, "enabled", lambda device: True)
    started: list[warmup.Warmup] = []
    real_start = warmup.Warmup.start
    monkeypatch.setattr(
        warmup.Warmup, "start", lambda self, state: started.append(self) or real_start(self, state)
    )
    warmed = load_quantized(our_folder)
    assert len(started) == 1
    assert started[0].error is None
    assert torch.get_default_dtype() == torch.float32
    assert torch.nn.Module.register_parameter is register
    assert torch.nn.init.normal_ is normal
    assert PreTrainedModel.init_weights is init_weights
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, warmed(IDS).logits)


def test_the_context_is_primed_for_cuda_only_and_a_missing_driver_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cuda_context.prime(torch.device("cpu")) is None
    monkeypatch.setattr(cuda_context, "DRIVER", "libno-such-cuda-driver.so")
    primed = cuda_context.PrimedContext(0)
    primed.release()  # joins the thread: it found no driver and retained nothing
    assert not primed.retained
    assert primed.error is not None
    assert "OSError" in primed.error


def test_the_warmup_leaves_no_layer_for_the_garbage_collector(our_folder: Path) -> None:
    # On a GPU its layers hold device tensors: a reference cycle among them (a sibling group and its
    # members) would keep those allocated after the load, until a collection; the CUDA stream test's
    # memory bound caught that. With the collector off, every layer must go with its last reference.
    from converter.loader.module import QuantLinear4bit

    def layers() -> int:
        return sum(issubclass(type(o), QuantLinear4bit) for o in gc.get_objects())

    state = open_checkpoint(shard_files(our_folder)[0]).records()
    gc.collect()
    gc.disable()
    try:
        before = layers()
        warm = warmup.Warmup(torch.device("cpu"), our_folder, torch.bfloat16)
        warm.start(state)
        warm.join()
        assert warm.error is None
        assert layers() == before
    finally:
        gc.enable()


def test_the_switch_interval_is_shorter_inside_and_restored_after() -> None:
    before = sys.getswitchinterval()
    seen: list[float] = []

    def failing_load() -> None:
        with gil.short_switch_interval(0.0001):
            seen.append(sys.getswitchinterval())
            msg = "inside"
            raise RuntimeError(msg)

    with pytest.raises(RuntimeError, match="inside"):
        failing_load()
    assert seen[0] < before
    assert sys.getswitchinterval() == before  # restored on the way out of a failed load too
    with gil.short_switch_interval(before * 2):  # never raised
        assert sys.getswitchinterval() == before
    try:  # a value set by someone else while the block ran is theirs: left as it is
        with gil.short_switch_interval(0.0001):
            sys.setswitchinterval(0.002)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)
