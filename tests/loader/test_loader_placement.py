"""device_map / max_memory / disk offload of load_quantized (converter.loader.placement), on the CPU.

Every comparison with the single-device load is exact (torch.equal): with any device_map on this
machine every module runs the same kernels on the same CPU with the same inputs; accelerate's hooks
only move tensors between devices (a no-op from CPU to CPU), and a disk module's dropped pages are
read back from the same shard bytes. Any difference is a placement bug, not rounding.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from click.testing import CliRunner
from loader_helpers import save_tiny_llama

from converter.loader.file_mappings import file_mappings, mapped_from, page_ranges
from converter.loader.footprint import memory_by_device, module_tensors
from converter.loader.head import GemvHead
from converter.loader.model import ModelBuildError, load_quantized
from converter.loader.module import QuantLinear4bit
from converter.loader.placement import (
    PlacementError,
    ReleaseMappedPages,
    _tensors_under,
    accelerator_device,
    bytes_per_device,
    dispatch,
    plan_device_map,
    size_proxy,
)
from converter.loader.state import load_quantized_state, shard_files
from formats.reader import open_shard
from formats.record import QuantizedTensor

IDS = torch.tensor([[1, 5, 9, 30, 7, 100, 3]])
#: accelerate's module names of the tiny Llama (loader_helpers.TINY_LLAMA: 2 layers, untied head).
CPU_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _greedy(model: torch.nn.Module) -> torch.Tensor:
    return model.generate(IDS, max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def reference(our_folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    model = load_quantized(our_folder)
    return _logits(model), _greedy(model)


def _hooks(module: torch.nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def _shard_rss(folder: Path) -> int:
    """Resident bytes of this process's mappings of ``folder``'s shards (/proc/self/smaps)."""
    paths = {str(p.resolve()) for p in shard_files(folder)[0]}
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if not head[0].endswith(":"):
            inside = len(head) == 6 and head[5] in paths
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def test_dict_map_cpu_and_disk_equal_logits_and_generate(our_folder: Path, reference) -> None:
    model = load_quantized(our_folder, device_map=CPU_DISK)
    assert model.hf_device_map == CPU_DISK
    assert torch.equal(_logits(model), reference[0])
    assert torch.equal(_greedy(model), reference[1])
    # Disk and CPU layers keep their 4-bit codes (uint8, not a float copy), still views of the shards.
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear4bit)
    assert down.weight.dtype == torch.uint8
    shards = shard_files(our_folder)[0]
    assert mapped_from(down.weight, shards)
    assert mapped_from(down.weight.quant_state.absmax, shards)
    # Only the disk modules release their mapped pages after each forward.
    assert any(isinstance(h, ReleaseMappedPages) and h.ranges for h in _hooks(model.model.layers[1]))
    assert not any(isinstance(h, ReleaseMappedPages) for h in _hooks(model.model.layers[0]))


def test_max_memory_forces_a_cpu_disk_split(our_folder: Path, reference) -> None:
    model = load_quantized(our_folder, device_map="sequential", max_memory={"cpu": "70kB"})
    devices = set(model.hf_device_map.values())
    assert devices == {"cpu", "disk"}, model.hf_device_map
    # accelerate keeps room for the largest layer besides what it places: the CPU share stays within budget.
    held = memory_by_device(model)
    assert 0 < held["cpu"] <= 70_000
    assert torch.equal(_logits(model), reference[0])
    assert torch.equal(_greedy(model), reference[1])


@pytest.mark.parametrize("strategy", ["auto", "balanced", "balanced_low_0", "sequential"])
def test_max_memory_may_name_the_disk(our_folder: Path, strategy: str) -> None:
    """A "disk" entry (accelerate's max_memory key, and one our errors suggest) plans as without it;
    the balanced strategies failed with torch's RuntimeError "Expected one of cpu, cuda, ... disk"."""
    model = load_quantized(our_folder, device_map=strategy, max_memory={"cpu": "70kB", "disk": "1GB"})
    assert model.hf_device_map == plan_device_map(model, strategy, {"cpu": "70kB"})
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}


def _record_bytes(record: QuantizedTensor) -> int:
    """Bytes a 4-bit weight holds once loaded: codes, absmax, maps, nested scales and the offset scalar."""
    tensors = [record.packed, record.absmax, record.quant_map]
    if record.nested is not None:
        tensors += [record.nested.nested_absmax, record.nested.nested_quant_map]
    offset = 4 if record.nested is not None else 0  # a float32 scalar tensor in the quant state
    return sum(t.numel() * t.element_size() for t in tensors) + offset


def test_plan_sizes_4bit_layers_by_their_record_bytes(our_folder: Path) -> None:
    from accelerate.utils import compute_module_sizes

    model = load_quantized(our_folder)
    state = load_quantized_state(our_folder, verify=False)
    sizes = compute_module_sizes(size_proxy(model))
    record = state["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(record, QuantizedTensor)
    assert sizes["model.layers.0.mlp.down_proj"] == _record_bytes(record)
    # accelerate on the model itself would see only the packed codes (and miss absmax + maps).
    assert compute_module_sizes(model)["model.layers.0.mlp.down_proj"] < _record_bytes(record)


def test_footprint_is_the_record_bytes(our_folder: Path) -> None:
    """get_memory_footprint == bytes of the shards' tensors as loaded, counted independently."""
    expected = 0
    for path in shard_files(our_folder)[0]:
        shard = open_shard(path)
        for key in shard.keys():
            if ".quant_state.bitsandbytes__" in key:
                continue  # JSON blob: parsed at load, not held as a tensor
            entry = shard.entry(key)
            expected += entry.end - entry.begin
    state = load_quantized_state(our_folder, verify=False)
    expected += 4 * sum(isinstance(v, QuantizedTensor) and v.nested is not None for v in state.values())
    model = load_quantized(our_folder)
    expected += sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype != torch.uint8)
    assert model.get_memory_footprint() == expected


def test_inspect_memory_estimate_equals_the_loaded_footprint(our_folder: Path) -> None:
    from converter.cli import cli

    args = ["inspect", str(our_folder), "--memory", "--json", "--device-map", "sequential"]
    r = CliRunner().invoke(cli, [*args, "--max-memory", "cpu=70kB"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    estimate = json.loads(r.stdout)
    model = load_quantized(our_folder, device_map="sequential", max_memory={"cpu": "70kB"})
    assert estimate["device_map"] == {k: str(v) for k, v in model.hf_device_map.items()}
    assert estimate["bytes_per_device"] == memory_by_device(model)
    assert estimate["total"] == model.get_memory_footprint()


@pytest.mark.parametrize("strategy", ["sequential", "auto"])
def test_several_gpus_with_a_cpu_stand_in(our_folder: Path, reference, strategy: str) -> None:
    """The several-GPU path (plan over GPU indices, blocks on different devices, accelerate's hooks moving
    activations) with each GPU index run by the CPU; the real several-GPU run is issue 17."""
    model = load_quantized(our_folder)
    budget = {0: 75_000, 1: 75_000, "cpu": "1GB"}  # each GPU: one ~33 kB block + accelerate's reserve
    plan = plan_device_map(model, strategy, budget)
    assert {0, 1} <= set(plan.values()), plan
    assert sum(bytes_per_device(model, plan).values()) == model.get_memory_footprint()
    asked: list = []

    def stand_in(device: int | str) -> torch.device:
        asked.append(device)
        return torch.device("cpu")

    dispatch(model, plan, execution_device=stand_in)
    assert {0, 1} <= set(asked)
    for name, device in plan.items():  # each block has accelerate's device hook, every device a CPU
        align = [h for h in _hooks(model.get_submodule(name)) if hasattr(h, "execution_device")]
        assert align, (name, device)
        assert align[0].execution_device == torch.device("cpu"), (name, device)
    assert torch.equal(_logits(model), reference[0])
    assert torch.equal(_greedy(model), reference[1])
    assert accelerator_device(1) == torch.device("cuda", 1)
    assert accelerator_device("disk") == torch.device("cpu")


def test_disk_pages_leave_the_process_after_each_forward(our_folder: Path, tmp_path: Path) -> None:
    mapped, offloaded = tmp_path / "mapped", tmp_path / "offloaded"  # own files: own mappings
    shutil.copytree(our_folder, mapped)
    shutil.copytree(our_folder, offloaded)
    plain = load_quantized(mapped)
    _logits(plain)
    quantized = sum(m.weight.numel() for m in plain.modules() if isinstance(m, QuantLinear4bit))
    assert _shard_rss(mapped) >= quantized  # a plain load keeps every touched page: the test can fail

    model = load_quantized(offloaded, device_map={"": "disk"})
    _logits(model)
    # What stays is at most the partial first and last page of each run of tensors (rounded inward).
    spans = sum(len(h.ranges) for h in _hooks(model) if isinstance(h, ReleaseMappedPages))
    assert spans >= 1
    assert _shard_rss(offloaded) <= 2 * 4096 * len(shard_files(offloaded)[0]) * spans


def test_disk_tensor_cast_at_load_goes_to_offload_folder(our_folder: Path, tmp_path: Path) -> None:
    f32 = load_quantized(our_folder, dtype=torch.float32)  # shards hold bf16: norms/embeddings are cast
    with pytest.raises(PlacementError, match=r"'model\.layers\.1\.input_layernorm\.weight'.*offload_folder"):
        load_quantized(our_folder, dtype=torch.float32, device_map=CPU_DISK)
    off = tmp_path / "offload"
    model = load_quantized(our_folder, dtype=torch.float32, device_map=CPU_DISK, offload_folder=off)
    [load_folder] = off.iterdir()  # one folder per load (another load's files are never rewritten)
    written = sorted(p.name for p in load_folder.iterdir())
    # Only the cast (non-4-bit) parameters of disk modules: never a 4-bit layer, never a CPU module.
    assert written == [
        "lm_head.weight.dat",
        "model.layers.1.input_layernorm.weight.dat",
        "model.layers.1.post_attention_layernorm.weight.dat",
    ]
    assert torch.equal(_logits(model), _logits(f32))


def test_a_relative_offload_folder_is_cleaned_up_after_a_chdir(
    our_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative offload_folder ("offload", as tutorials write it): the load's own folder inside it is
    removed when the model is freed even if the process changed directory in between (the finalizer
    held the relative path and missed it)."""
    import gc

    monkeypatch.chdir(tmp_path)
    model = load_quantized(our_folder, dtype=torch.float32, device_map=CPU_DISK, offload_folder="offload")
    assert len(list((tmp_path / "offload").iterdir())) == 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    del model
    gc.collect()
    assert list((tmp_path / "offload").iterdir()) == []


def test_two_models_sharing_an_offload_folder_keep_their_own_weights(
    our_folder: Path, tmp_path: Path
) -> None:
    """Two different checkpoints of one architecture loaded into one process with the same
    offload_folder (a fixed name, as tutorials write it): their cast disk parameters have the same
    names, and the second load must not overwrite the files the first model is mapped from."""
    from converter.writer.pipeline import convert

    other = convert(save_tiny_llama(tmp_path / "plain1", seed=1), tmp_path / "other", progress=False).output
    off = tmp_path / "offload"
    first = load_quantized(our_folder, dtype=torch.float32, device_map=CPU_DISK, offload_folder=off)
    want = _logits(load_quantized(our_folder, dtype=torch.float32))
    assert torch.equal(_logits(first), want)
    second = load_quantized(other, dtype=torch.float32, device_map=CPU_DISK, offload_folder=off)
    assert torch.equal(_logits(second), _logits(load_quantized(other, dtype=torch.float32)))
    assert torch.equal(_logits(first), want)


def test_bad_requests_are_named(our_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelBuildError, match="either device="):
        load_quantized(our_folder, device="meta", device_map="auto")
    with pytest.raises(PlacementError, match="max_memory applies"):
        load_quantized(our_folder, device_map=CPU_DISK, max_memory={"cpu": "1GB"})
    with pytest.raises(PlacementError, match="device_map='everywhere'"):
        load_quantized(our_folder, device_map="everywhere")
    with pytest.raises(PlacementError, match="lm_head"):
        load_quantized(our_folder, device_map={k: v for k, v in CPU_DISK.items() if k != "lm_head"})

    from converter.writer.pipeline import convert

    tied = tmp_path / "tied"
    convert(save_tiny_llama(tmp_path / "plain", tie_word_embeddings=True), tied, progress=False)
    split = {**CPU_DISK, "lm_head": "disk", "model.embed_tokens": "cpu"}
    with pytest.raises(PlacementError, match="tied weights on different devices"):
        load_quantized(tied, device_map=split)


def test_a_partial_map_names_the_modules_it_misses(our_folder: Path) -> None:
    """A map that misses modules gave accelerate's one line naming every tensor, each 4-bit weight's
    buffers included (about 90 names for two layers); now the largest modules left out, once."""
    from converter.cli import cli

    partial = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1.mlp": "cpu",
               "lm_head": "cpu", "model.layer": "cpu"}  # fmt: skip
    said = (
        "device_map gives no device to 'model.layers.1.self_attn', 'model.layers.1.input_layernorm', "
        "'model.layers.1.post_attention_layernorm', 'model.norm' (27 tensors); no module is named "
        "'model.layer'; map them, a parent module, or '' (everything not listed) to a device"
    )
    with pytest.raises(PlacementError) as info:
        load_quantized(our_folder, device_map=partial)
    assert str(info.value) == said
    r = CliRunner().invoke(cli, ["inspect", str(our_folder), "--memory", "--device-map", json.dumps(partial)])
    assert (r.exit_code, r.stderr) == (2, f"Error: {said}\n")


def test_inspect_memory_bad_options_are_named(our_folder: Path) -> None:
    from converter.cli import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["inspect", str(our_folder), "--memory", "--max-memory", "cpu"])
    assert r.exit_code == 2
    assert "expected DEVICE=SIZE" in r.output
    r = runner.invoke(cli, ["inspect", str(our_folder), "--memory", "--device-map", "{not json"])
    assert r.exit_code == 2
    assert "--device-map: not valid JSON" in r.output
    # was "unexpected ValueError: unsupported dtype 'fp64' ...; set QUANTIZE_MODEL_DEBUG=1", exit 1
    r = runner.invoke(cli, ["inspect", str(our_folder), "--memory", "--dtype", "fp64"])
    assert r.exit_code == 2
    assert "Invalid value for '--dtype'" in r.output
    assert runner.invoke(cli, ["inspect", str(our_folder), "--memory", "--dtype", "Float16"]).exit_code == 0
    # the short names convert and dequantize take: the same estimate (was "Invalid value for '--dtype'")
    for short, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        r = runner.invoke(cli, ["inspect", str(our_folder), "--memory", "--dtype", short, "--json"])
        assert r.exit_code == 0, r.output
        full = runner.invoke(cli, ["inspect", str(our_folder), "--memory", "--dtype", name, "--json"])
        assert json.loads(r.stdout) == json.loads(full.stdout)


def test_a_gpu_index_that_does_not_exist_is_a_placement_error(our_folder: Path) -> None:
    """The README's `max_memory={0: "20GiB", "cpu": "2GiB"}` on a machine without that GPU printed
    accelerate's warnings twice, then raised "AssertionError: Torch not compiled with CUDA enabled"."""
    missing = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(PlacementError, match=f"max_memory names GPU {missing}, but "):
        load_quantized(our_folder, device_map="auto", max_memory={missing: "20GiB", "cpu": "2GiB"})
    with pytest.raises(PlacementError, match=f"device_map puts 'model' on GPU {missing}, but "):
        load_quantized(our_folder, device_map={"model": str(missing), "lm_head": "cpu"})
    with pytest.raises(PlacementError, match=re.escape(f"device_map={missing} (GPU {missing}), but ")):
        load_quantized(our_folder, device_map=missing)  # a GPU index, as transformers takes it


def test_estimate_onto_a_gpu_this_machine_lacks_plans_it_and_says_so(our_folder: Path) -> None:
    """`inspect --memory --max-memory 0=...` on a machine without GPU 0 printed a plan with layers on
    cuda:0, exit 0, and nothing but accelerate's "Device 0 is not available, available devices are []"
    twice (load_quantized refuses the same request). The plan is still made (it is the one on a machine
    with that GPU: planning for a GPU host from a laptop), with one warning saying so: stderr, `warnings`
    in --json, an AbsentDeviceWarning from estimate()."""
    from converter.cli import cli
    from converter.loader.estimate import estimate

    missing = torch.cuda.device_count() if torch.cuda.is_available() else 0
    said = f"max_memory names GPU {missing}, but "
    cli_args = [
        "inspect",
        str(our_folder),
        "--memory",
        "--max-memory",
        f"{missing}=70kB",
        "--max-memory",
        "cpu=1GB",
    ]
    for json_out in (False, True):
        r = CliRunner().invoke(cli, [*cli_args, *(["--json"] if json_out else [])])
        assert r.exit_code == 0, r.output
        warned = [line for line in r.stderr.splitlines() if line.startswith("Warning: ")]
        assert len(warned) == 1, r.stderr
        assert warned[0].startswith(f"Warning: {said}"), r.stderr
        assert "this is the plan on a machine that has it (load_quantized refuses it here)" in warned[0]
        assert "is not available, available devices are" not in r.stderr  # accelerate's, said by ours
        if json_out:
            out = json.loads(r.stdout)
            assert out["warnings"] == [warned[0].removeprefix("Warning: ")]
            assert f"cuda:{missing}" in out["bytes_per_device"]
    from converter.loader.devices import AbsentDeviceWarning

    with pytest.warns(AbsentDeviceWarning, match=said):
        plan, per_device = estimate(our_folder, "auto", {missing: "70kB", "cpu": "1GB"})
    assert missing in plan.values()
    assert per_device[f"cuda:{missing}"] > 0
    with pytest.warns(AbsentDeviceWarning, match=f"device_map puts 'lm_head' on GPU {missing}, but "):
        estimate(our_folder, {"": "cpu", "lm_head": missing})
    # a plan onto devices that exist says nothing
    r = CliRunner().invoke(cli, ["inspect", str(our_folder), "--memory", "--max-memory", "cpu=1GB", "--json"])
    assert (r.exit_code, r.stderr, json.loads(r.stdout)["warnings"]) == (0, "", [])


def test_a_gpu_index_as_device_map_plans_the_whole_model_on_it(our_folder: Path) -> None:
    """``device_map=1`` is ``{"": 1}`` for transformers; the plan used to refuse it (torch.device(1) is
    no device without CUDA)."""
    model = load_quantized(our_folder, verify=False)
    assert plan_device_map(model, 1) == {"": 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no GPU")
@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"device": "cuda"}, "device='cuda'"),
        ({"device": "cuda:0"}, "device='cuda:0'"),
        ({"device": torch.device("cuda", 1)}, "device='cuda:1'"),
        # a GPU index, as torch takes it: torch.device(0) raised "Cannot access accelerator device when
        # none is available", naming no device (load_quantized_state too)
        ({"device": 0}, "device=0 (GPU 0)"),
        ({"device_map": "cuda:0"}, "device_map='cuda:0'"),
        ({"device_map": {"": "cuda"}}, "device_map puts '' on 'cuda'"),
        ({"device_map": {"": 0}}, "device_map puts '' on GPU 0"),
        ({"device_map": 0}, "device_map=0 (GPU 0)"),  # transformers' form: was "expected one of auto, ..."
        ({"device_map": "auto", "max_memory": {"cuda:0": "1GiB"}}, "max_memory names 'cuda:0'"),
    ],
)
def test_a_gpu_without_cuda_is_a_placement_error_before_any_work(
    tmp_path: Path, kwargs: dict, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`load_quantized(folder, device="cuda")` with a CPU-only torch raised torch's "AssertionError:
    Torch not compiled with CUDA enabled" from inside the load. Now a PlacementError naming the device
    and the torch build, raised before the folder is even looked at (this one does not exist)."""
    missing = tmp_path / "not-read"
    if torch.version.cuda is None:
        why = f"CUDA is not available in this torch build (torch {torch.__version__}"
    else:
        why = "no CUDA device is available here"
    with pytest.raises(PlacementError, match=re.escape(f"{named}, but {why}")):
        load_quantized(missing, **kwargs)
    if "device" in kwargs:
        with pytest.raises(PlacementError, match=re.escape(f"{named}, but {why}")):
            load_quantized_state(missing, device=kwargs["device"])
    # a CUDA build of torch on a machine without a GPU says so instead
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    no_gpu = f"{named}, but no CUDA device is available here (torch {torch.__version__}, CUDA 12.8)"
    with pytest.raises(PlacementError, match=re.escape(no_gpu)):
        load_quantized(missing, **kwargs)


@pytest.mark.parametrize("kwargs", [{"device": "meta"}, {"device_map": "meta"}, {"device_map": {"": "meta"}}])
def test_meta_is_refused(our_folder: Path, kwargs: dict) -> None:
    """`device="meta"` read and verified the shards, then returned a model with every tensor on meta
    (no weights), whose forward failed inside a kernel ("Tensor.item() cannot be called on meta
    tensors"); it is refused with a PlacementError (an InputError)."""
    with pytest.raises(PlacementError, match="'meta' is not a device a quantized model can be loaded onto"):
        load_quantized(our_folder, **kwargs)


@pytest.mark.skipif(torch.backends.mps.is_available() or torch.xpu.is_available(), reason="needs no MPS/XPU")
@pytest.mark.parametrize(
    ("kwargs", "named", "kind"),
    [
        ({"device": "mps"}, "device='mps'", "mps"),
        ({"device": torch.device("mps")}, "device='mps'", "mps"),
        ({"device": "xpu:0"}, "device='xpu:0'", "xpu"),
        ({"device_map": "xpu"}, "device_map='xpu'", "xpu"),
        ({"device_map": {"": "mps"}}, "device_map puts '' on 'mps'", "mps"),
        ({"device_map": "auto", "max_memory": {"mps": "1GiB"}}, "max_memory names 'mps'", "mps"),
    ],
)
def test_another_accelerator_this_torch_lacks_is_a_placement_error_before_any_work(
    tmp_path: Path, kwargs: dict, named: str, kind: str
) -> None:
    """`device="mps"` (a notebook moved from a Mac) on a torch without MPS failed deep inside the load
    with torch's "Could not run 'aten::empty.memory_format' with arguments from the 'MPS' backend"
    (NotImplementedError; XPU: "AssertionError: Torch not compiled with XPU enabled"), after the shards
    were read; as CUDA is, it is a PlacementError naming the device, before the folder is looked at."""
    missing = tmp_path / "not-read"
    why = f"{named}, but this torch (torch {torch.__version__}) has no {kind!r} device available"
    with pytest.raises(PlacementError, match=re.escape(why)):
        load_quantized(missing, **kwargs)
    if "device" in kwargs:
        with pytest.raises(PlacementError, match=re.escape(why)):
            load_quantized_state(missing, device=kwargs["device"])


_KILLED_LOAD = """
import os, signal, sys, torch
from converter.loader.model import load_quantized
device_map = {k: v for k, v in (a.split("=") for a in sys.argv[3:])}
model = load_quantized(sys.argv[1], dtype=torch.float32, device_map=device_map, offload_folder=sys.argv[2])
print("loaded", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_offload_folder_of_a_killed_process_is_removed_by_the_next_load(
    our_folder: Path, tmp_path: Path
) -> None:
    """Each load writes its cast disk parameters into a `qm-offload-*` folder of its own inside
    offload_folder, removed when the model is freed; a process killed before (SIGKILL, the OOM
    killer) left it there for good, as large as those parameters, one more per killed run of a
    script that reuses one offload_folder. Each folder is now locked while its model lives, and a
    load into the same offload_folder removes the ones whose process is gone."""
    import gc
    import os
    import subprocess
    import sys

    from converter.locks import lock_folder

    off = tmp_path / "offload"
    root = Path(__file__).resolve().parents[2]
    args = [f"{k}={v}" for k, v in CPU_DISK.items()]
    env = {**os.environ, "PYTHONPATH": str(root), "TORCHDYNAMO_DISABLE": "1"}
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_LOAD, str(our_folder), str(off), *args],
        env=env, cwd=root, capture_output=True, text=True,
    )  # fmt: skip
    assert child.returncode == -9, child.stderr
    assert "loaded" in child.stdout
    [killed] = off.iterdir()
    model = load_quantized(our_folder, dtype=torch.float32, device_map=CPU_DISK, offload_folder=off)
    [own] = off.iterdir()
    assert own != killed
    fd = lock_folder(own)
    if fd is not None:
        os.close(fd)
    assert fd is None, "a live model's offload folder must be locked"
    del model
    gc.collect()
    assert not any(off.iterdir())


def test_tied_weights_cast_to_disk_stay_tied_and_leave_ram(tmp_path: Path) -> None:
    """A tied embedding / head cast at load and sent to disk is written to offload_folder once and both
    modules map that one file: the head kept the RAM copy (the tie broken, the largest tensor of a small
    model held twice: once in RAM, once on disk), so the footprint was the estimate plus that copy."""
    from converter.loader.estimate import estimate
    from converter.writer.pipeline import convert

    plain = save_tiny_llama(tmp_path / "plain", tie_word_embeddings=True)
    folder = convert(plain, tmp_path / "tied", progress=False).output
    off = tmp_path / "offload"
    model = load_quantized(folder, dtype=torch.float32, device_map={"": "disk"}, offload_folder=off)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert mapped_from(model.lm_head.weight, list(off.iterdir()))
    _, expected = estimate(folder, {"": "disk"}, dtype=torch.float32)
    assert memory_by_device(model) == expected
    assert torch.equal(_logits(model), _logits(load_quantized(folder, dtype=torch.float32)))


def test_estimate_follows_the_keep_in_fp32_dtype_plan(tiny_checkpoint, tmp_path: Path) -> None:
    """T5's `wo` (``_keep_in_fp32_modules``) stays unquantized and loads in float32 under dtype=float16,
    as from_pretrained loads it; the estimate sized it in float16 (half its bytes)."""
    from converter.loader.estimate import estimate
    from converter.writer.pipeline import convert

    folder = convert(tiny_checkpoint("t5"), tmp_path / "t5", progress=False).output
    model = load_quantized(folder, dtype=torch.float16, device_map="cpu")
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.dtype == torch.float32  # the plan is in force: the test can fail
    _, expected = estimate(folder, "cpu", dtype=torch.float16)
    assert expected == memory_by_device(model)


def test_disk_hooks_never_drop_pages_of_a_mapping_that_was_unmapped(our_folder: Path, tmp_path: Path) -> None:
    """`model.to(torch.float32)` replaces the disk lm_head's shard view by a cast copy; its shard (which
    holds nothing else) was then unmapped, but the hook kept dropping the old address range after each
    forward: MADV_DONTNEED zeroed whatever the process mapped there next (a private anonymous mapping
    of that size lands there, and was found zeroed). The hook keeps the mapping alive instead."""
    import gc

    folder = shutil.copytree(our_folder, tmp_path / "own")  # own files: own mappings
    [shard] = {p for p in shard_files(folder)[0] if list(open_shard(p).keys()) == ["lm_head.weight"]}
    model = load_quantized(folder, device_map={"model": "cpu", "lm_head": "disk"})
    [hook] = [h for h in _hooks(model.lm_head) if isinstance(h, ReleaseMappedPages)]
    assert hook.ranges
    model.to(torch.float32)
    gc.collect()
    live = file_mappings([shard])
    assert all(any(a <= start and end <= b for a, b in live) for start, end in hook.ranges)
    assert torch.equal(_logits(model), _logits(load_quantized(our_folder, dtype=torch.float32)))


@pytest.mark.parametrize("device", ["disk", "cpu"])
def test_a_map_key_naming_no_module_is_named(our_folder: Path, device: str) -> None:
    """A key naming no module or tensor of the model (a typo) failed deep in dispatch with
    AttributeError "'LlamaModel' object has no attribute 'layer'" when it said "disk", and was ignored
    (the module it meant left where '' put it) when it said "cpu"; now it is refused up front."""
    typo = {"": "cpu", "model.layer.1": device}
    with pytest.raises(PlacementError, match=r"no module or tensor is named 'model\.layer\.1'"):
        load_quantized(our_folder, device_map=typo)
    with pytest.raises(PlacementError, match=r"'model\.layer\.1'"):
        plan_device_map(load_quantized(our_folder), typo)


@pytest.mark.parametrize("dtype", ["auto", None])
def test_estimate_takes_the_dtypes_load_quantized_takes(
    tiny_checkpoint, tmp_path: Path, dtype: str | None
) -> None:
    """load_quantized(dtype="auto" / None) loads in the checkpoint's dtype (GPT-2's: float32, not the
    default bfloat16); estimate refused both ("unsupported dtype 'auto'") although it returns what that
    load would hold."""
    from converter.loader.estimate import estimate
    from converter.writer.pipeline import convert

    folder = convert(tiny_checkpoint("gpt2"), tmp_path / "gpt2", progress=False).output
    model = load_quantized(folder, dtype=dtype, device_map="cpu")
    assert model.transformer.wte.weight.dtype == torch.float32
    assert estimate(folder, "cpu", dtype=dtype) == (model.hf_device_map, memory_by_device(model))


def _resident_pages(model: torch.nn.Module, name: str, folder: Path) -> int:
    """Whole pages of the mapped tensors of module ``name`` present in this process (/proc/self/pagemap
    bit 63)."""
    import struct

    ranges = page_ranges(_tensors_under(model, name), file_mappings(shard_files(folder)[0]))
    count = 0
    with open("/proc/self/pagemap", "rb") as f:
        for a, b in ranges:
            f.seek(a // 4096 * 8)
            count += sum(e >> 63 for e in struct.unpack(f"{(b - a) // 4096}Q", f.read((b - a) // 4096 * 8)))
    return count


@pytest.mark.parametrize("entry", ["", "model"])
def test_a_whole_model_on_disk_drops_each_layers_pages_after_it_runs(
    our_folder: Path, tmp_path: Path, entry: str
) -> None:
    """A budget too small for any layer makes accelerate's plan {'': 'disk'}: the one hook on the
    whole model dropped the pages after the whole forward, so while it ran every layer's weights were
    resident at once (the whole model, against a max_memory of a layer). Each block
    (``_no_split_modules``) and each other module holding weights now drops its pages after its own
    forward, as the layers of a 'model.layers': 'disk' entry do."""
    folder = shutil.copytree(our_folder, tmp_path / "own")  # own files: own mappings
    device_map = {"": "disk"} if entry == "" else {"model": "disk", "lm_head": "cpu"}
    model = load_quantized(folder, device_map=device_map)
    seen: list[int] = []
    hook = model.model.layers[1].register_forward_pre_hook(
        lambda *_: seen.append(_resident_pages(model, "model.layers.0", folder))
    )
    plain = load_quantized(our_folder)
    assert torch.equal(_logits(model), _logits(plain))
    assert _resident_pages(plain, "model.layers.0", our_folder) >= 4  # a plain load keeps them: can fail
    hook.remove()
    assert seen == [0]


def _unsplit_llama() -> type:
    """A Llama class (repository code stand-in) whose whole decoder stack is one unsplittable block."""
    import transformers

    class WholeStackLlama(transformers.LlamaForCausalLM):
        _no_split_modules: ClassVar[list[str]] = ["LlamaModel"]

    return WholeStackLlama


@pytest.mark.parametrize("kind", ["head", "no_split"])
def test_estimate_takes_the_model_class_load_quantized_takes(
    our_folder: Path, tmp_path: Path, kind: str
) -> None:
    """load_quantized(model_class=X, **config_kwargs) builds X (another head, repository code with its
    own _no_split_modules); estimate took no model_class, so it planned and sized the folder's own
    class: another module map, other bytes. It takes both now, with load_quantized's meaning."""
    import warnings

    import transformers

    from converter.loader.estimate import estimate

    if kind == "head":  # a score head of 3 labels instead of the lm_head
        kwargs: dict = {"model_class": transformers.AutoModelForSequenceClassification, "num_labels": 3}
    else:
        kwargs = {"model_class": _unsplit_llama()}
    placement = {"device_map": "sequential", "max_memory": {"cpu": "70kB"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the new head's initialisation
        model = load_quantized(our_folder, **placement, **kwargs, offload_folder=tmp_path / "offload")
    plan, per_device = estimate(our_folder, **placement, **kwargs)
    assert (plan, per_device) == (model.hf_device_map, memory_by_device(model))
    assert sum(per_device.values()) == model.get_memory_footprint()
    own = estimate(our_folder, **placement)
    assert own != (plan, per_device)  # the test can fail: the folder's own class plans otherwise
    if kind == "head":
        assert "score" in plan
        assert "lm_head" not in plan
    with pytest.raises(TypeError, match=r"^estimate\(\) got an unexpected keyword argument 'nonsense'"):
        estimate(our_folder, "cpu", **kwargs, nonsense=1)


@pytest.mark.parametrize(("load_dtype", "cast"), [("bf16", "to_float32"), ("float32", "half")])
def test_a_cast_after_the_load_moves_disk_entries_to_the_cpu_in_the_map(
    our_folder: Path, tmp_path: Path, load_dtype: str, cast: str
) -> None:
    """`model.to(dtype)` / `.half()` on a model with disk modules copies their cast weights into RAM,
    but `hf_device_map` still said "disk" for them and `memory_by_device` counted those RAM copies on
    disk. An entry none of whose weights is read from the files any more (the unquantized lm_head) now
    says "cpu" and its page-dropping hooks let the old views go; one whose 4-bit weights (never cast) are
    still read from the shards stays "disk", its cast norms counted under "cpu"."""
    dtype = torch.float32 if load_dtype == "float32" else torch.bfloat16
    model = load_quantized(our_folder, dtype=dtype, device_map=CPU_DISK, offload_folder=tmp_path / "off")
    if load_dtype == "float32":
        assert mapped_from(model.lm_head.weight, [tmp_path / "off"])  # cast at load: in offload_folder
    before = memory_by_device(model)["disk"]
    same = load_quantized(our_folder, dtype=dtype, device_map=CPU_DISK, offload_folder=tmp_path / "off")
    same.to(dtype)  # no cast: every view stays, so does the map
    assert same.hf_device_map == CPU_DISK
    assert memory_by_device(same)["disk"] == before

    model = model.to(torch.float32) if cast == "to_float32" else model.half()
    assert model.hf_device_map == {**CPU_DISK, "lm_head": "cpu"}
    assert model.lm_head.weight.dtype == (torch.float32 if cast == "to_float32" else torch.float16)
    hooks = [h for h in _hooks(model.lm_head) if isinstance(h, ReleaseMappedPages)]
    assert hooks
    assert all(not h.ranges and not h.tensors for h in hooks)  # the old lm_head view is let go
    by_device = memory_by_device(model)
    layer = model.model.layers[1]
    four_bit = sum(
        size for name, _, size in module_tensors(layer) if name.endswith("_proj.weight")
    )  # the 4-bit weights (codes, quant state), still read from the shards
    assert by_device["disk"] == four_bit < before
    assert sum(by_device.values()) == model.get_memory_footprint()

    reference = load_quantized(our_folder, dtype=dtype)
    reference = reference.to(torch.float32) if cast == "to_float32" else reference.half()
    assert torch.equal(_logits(model), _logits(reference))


def test_a_lora_merged_into_disk_layers_stays_merged(our_folder: Path, tmp_path: Path) -> None:
    """PEFT's merge of a 16-bit layer (``weight.data += delta``) writes a disk module's shard view in place:
    its private copies of the pages were dropped after the next forward (``MADV_DONTNEED``), the file's
    bytes read back, and the merge silently undone from the second forward on (then ``unmerge`` took the
    delta off the original weight). Pages written in place are now kept; the 4-bit layers' merge replaces
    their weights, as it did. Every forward equals the same model loaded without disk offload, exactly."""
    import warnings

    import peft

    def lora(model: torch.nn.Module) -> torch.nn.Module:
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False)
        return peft.get_peft_model(model, config)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "merging into a 4-bit layer re-quantizes it"
        ram = lora(load_quantized(our_folder))
        disk = lora(load_quantized(our_folder, device_map=CPU_DISK, offload_folder=tmp_path / "off"))
        before = _logits(disk)
        for m in (ram, disk):
            m.merge_adapter()
        want = _logits(ram)
        assert not torch.equal(want, before)  # the merge changes the logits: the comparison can fail
        for _ in range(3):
            assert torch.equal(_logits(disk), want)
        for m in (ram, disk):
            m.unmerge_adapter()
    assert torch.equal(_logits(disk), _logits(ram))


def test_only_pages_never_written_are_dropped(tmp_path: Path) -> None:
    """The runs of a private file mapping that ReleaseMappedPages drops: pages read only (file pages) and
    pages never touched, around the pages written in place, which are kept; dropping the runs leaves the
    written bytes and reads the others back from the file."""
    import mmap

    from converter.loader.file_mappings import drop_pages, unwritten_runs

    page = mmap.PAGESIZE
    path = tmp_path / "f"
    path.write_bytes(bytes(range(1, 9)) * page)  # 8 pages of nonzero bytes
    with path.open("rb") as f:
        flags, prot = mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE
        mapped = mmap.mmap(f.fileno(), 8 * page, flags=flags, prot=prot)
    view = torch.frombuffer(mapped, dtype=torch.uint8)
    start = view.data_ptr()
    assert int(view[: 4 * page].sum()) > 0  # pages 0..3 read: file pages
    want = bytearray(path.read_bytes())
    view[2 * page : 3 * page] = 0  # page 2 written whole
    want[2 * page : 3 * page] = bytes(page)
    view[5 * page + 10] = 0  # one byte of page 5, never read before
    want[5 * page + 10] = 0
    runs = unwritten_runs(start, start + 8 * page)
    pages = [((a - start) // page, (b - start) // page) for a, b in runs]
    assert pages == [(0, 2), (3, 5), (6, 8)]
    drop_pages(runs)
    assert torch.equal(view, torch.frombuffer(want, dtype=torch.uint8))
    del view
    mapped.close()


def test_resize_token_embeddings_moves_the_new_disk_head_to_the_cpu_in_the_map(
    our_folder: Path, tmp_path: Path
) -> None:
    """`model.resize_token_embeddings(n)` (a token added for fine-tuning) replaces a disk `lm_head` by a
    new one in RAM, but `hf_device_map` kept saying "disk" for it (and its page-dropping hook, which
    transformers moves to the new module, kept the old views) while `memory_by_device` counted it under
    "cpu". Now the map says "cpu", as after a cast; an entry still read from the shards stays "disk"."""
    model = load_quantized(our_folder, device_map=CPU_DISK, offload_folder=tmp_path / "off")
    old = _logits(model)
    model.resize_token_embeddings(old.shape[-1] + 8)
    head = model.get_output_embeddings()
    assert type(head) is GemvHead  # the new head runs our GEMV too (loader/head.py), under its hook
    assert head._old_forward.__func__ is GemvHead.forward
    assert model.hf_device_map == {**CPU_DISK, "lm_head": "cpu"}
    assert all(
        not h.ranges and not h.tensors for h in _hooks(model.lm_head) if isinstance(h, ReleaseMappedPages)
    )
    assert set(memory_by_device(model)) == {"cpu", "disk"}
    new = _logits(model)
    assert torch.equal(new[..., : old.shape[-1]], old)


def test_a_cast_of_a_submodule_moves_its_disk_entries_to_the_cpu_in_the_map(
    our_folder: Path, tmp_path: Path
) -> None:
    """`model.lm_head.half()` / `model.model.half()` (a submodule, not the model) copies the cast disk
    weights into RAM as `model.half()` does, but only a cast of the model itself updated `hf_device_map`:
    it kept saying "disk" for entries read from the files no more (and their page-dropping hooks kept the
    old views). Now the same entries say "cpu" as after `model.half()`; entries whose 4-bit weights are
    still read from the shards stay "disk"."""
    device_map = {**CPU_DISK, "model.norm": "disk"}
    model = load_quantized(our_folder, device_map=device_map, offload_folder=tmp_path / "off")
    model.lm_head.half()
    assert model.hf_device_map == {**device_map, "lm_head": "cpu"}
    assert all(
        not h.ranges and not h.tensors for h in _hooks(model.lm_head) if isinstance(h, ReleaseMappedPages)
    )
    model.model.half()  # model.norm (a disk entry below it) cast; model.layers.1 keeps its 4-bit weights
    assert model.hf_device_map == {**device_map, "lm_head": "cpu", "model.norm": "cpu"}
    whole = load_quantized(our_folder, device_map=device_map, offload_folder=tmp_path / "off").half()
    assert whole.hf_device_map == model.hf_device_map
    assert memory_by_device(whole) == memory_by_device(model)
    assert torch.equal(_logits(model), _logits(whole))


@pytest.mark.parametrize("which", ["output", "input"])
def test_set_embeddings_moves_the_new_disk_module_to_the_cpu_in_the_map(
    our_folder: Path, tmp_path: Path, which: str
) -> None:
    """`model.set_output_embeddings(new_head)` (or `set_input_embeddings`) on a model whose head is on disk
    puts a module in RAM where the map said "disk": `hf_device_map` kept "disk" for it while
    `memory_by_device` counted it under "cpu", as `resize_token_embeddings` did before. Now the map says
    "cpu", as after a cast; the entries still read from the shards stay "disk"."""
    device_map = {**CPU_DISK, "model.embed_tokens": "disk"} if which == "input" else CPU_DISK
    model = load_quantized(our_folder, device_map=device_map, offload_folder=tmp_path / "off")
    old = _logits(model)  # a new head is a GemvHead too (loader/head.py): the same kernel
    get = getattr(model, f"get_{which}_embeddings")
    weight = get().weight.detach().clone()  # read from the offload folder by its hook? the mapped shard
    if which == "output":
        new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
    else:
        new = torch.nn.Embedding(*weight.shape, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
    getattr(model, f"set_{which}_embeddings")(new)
    entry = "lm_head" if which == "output" else "model.embed_tokens"
    assert model.hf_device_map == {**device_map, entry: "cpu"}
    assert model.hf_device_map["model.layers.1"] == "disk"
    assert torch.equal(_logits(model), old)
