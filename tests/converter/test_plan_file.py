"""TOML batch plans: defaults, overrides, variants, refusals naming file/line/key; --only partitions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from converter.errors import InputError
from converter.tools.plan_file import Job, load_plan, parse_only, select_part

PLAN = """\
[defaults]
quant_type = "nf4"
double_quant = true
output_root = "converted"

[[job]]
source = "meta-llama/Llama-3.1-8B"
revision = "main"
push_to = "my-org/Llama-3.1-8B-nf4"

[[job]]
source = "./local-model"
output = "local-model-fp4"
quant_type = "fp4"
skip = "lm_head"

[[job]]
source = "org/small"
variants = [
  {quant_type = "nf4"}, {quant_type = "fp4", double_quant = false}, {blocksize = 128, output = "s128"},
]
"""


def test_defaults_jobs_and_variants(tmp_path: Path) -> None:
    (tmp_path / "local-model").mkdir()
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(PLAN)
    plan = load_plan(plan_path)
    assert plan.output_root == (tmp_path / "converted").resolve()
    by_name = {j.output: j for j in plan.jobs}
    assert list(by_name) == [
        "meta-llama--Llama-3.1-8B",
        "local-model-fp4",
        "org--small-nf4",
        "org--small-fp4-no-double-quant",
        "s128",
    ]
    llama = by_name["meta-llama--Llama-3.1-8B"]
    assert llama.revision == "main"
    assert llama.push_to == "my-org/Llama-3.1-8B-nf4"
    assert llama.options == {"quant_type": "nf4", "double_quant": True}
    local = by_name["local-model-fp4"]
    assert local.source == str((tmp_path / "local-model").resolve())  # relative to the plan file
    assert local.options == {"quant_type": "fp4", "double_quant": True, "skip": ("lm_head",)}
    assert by_name["org--small-fp4-no-double-quant"].options == {"quant_type": "fp4", "double_quant": False}
    assert by_name["s128"].options == {"quant_type": "nf4", "double_quant": True, "blocksize": 128}
    assert llama.where == f"{plan_path}:6"


def test_cli_options_override_defaults_not_job_keys(tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(PLAN)
    plan = load_plan(plan_path, {"quant_type": "fp4", "blocksize": 256})
    by_name = {j.output: j for j in plan.jobs}
    assert by_name["meta-llama--Llama-3.1-8B"].options["quant_type"] == "fp4"
    assert by_name["s128"].options["blocksize"] == 128  # the variant's own key wins


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[defaults]\nquant_type = "nf5"\n\n[[job]]\nsource = "a/b"\n',
            r"plan.toml:2: \[defaults\]: key 'quant_type': 'nf5' is not valid: use nf4, fp4 or int8",
        ),
        (
            '[[job]]\nsource = "a/b"\n\n[[job]]\nsource = "c/d"\n# comment\nblock_size = 64\n',
            r"plan.toml:7: job 2: key 'block_size' is unknown; did you mean 'blocksize'\?",
        ),
        (
            '[[job]]\nsource = "a/b"\n\n[defaults]\nblocksize = 64\n\n[[job]]\nsource = "c/d"\nskip = 3\n',
            r"plan.toml:9: job 2: key 'skip': 3 is not valid: use a list of strings",
        ),
        (
            '[[job]]\nsource = "a/b"\nblocksize = 100\n',
            r"plan.toml:3: job 1: key 'blocksize': 100 is not valid: use 32, 64, 128",
        ),
        (
            '[[job]]\nsource = "a/b"\ndouble_quant = "yes"\n',
            r"plan.toml:3: job 1: key 'double_quant': 'yes' is not valid: use true or false",
        ),
        (
            '[[job]]\nsource = "a/b"\nvariants = [{quant_type = "nf4"}, {quant_typo = "fp4"}]\n',
            r"plan.toml:3: job 1: key 'quant_typo' is unknown; did you mean 'quant_type'\?",
        ),
        (
            '[[job]]\nsource = "a/b"\nmoe_experts = "drop"\n',
            r"plan.toml:3: job 1: key 'moe_experts': 'drop' is not valid: use keep or quantize",
        ),
        (  # a batch option, not a job's: said so, and the option to give (it was "is unknown")
            '[[job]]\nsource = "a/b"\ndry_run = true\n',
            r"plan.toml:3: job 1: key 'dry_run' is not a plan key: the batch command sets it "
            r"\(give `batch --dry-run`\)$",
        ),
        (
            '[defaults]\noverwrite = true\n[[job]]\nsource = "a/b"\n',
            r"plan.toml:2: \[defaults\]: key 'overwrite' is not a plan key: the batch command sets it "
            r"\(give `batch --force`\)$",
        ),
        (  # a job's key in [defaults] was "key 'revision' is unknown; did you mean 'revision'?"
            '[defaults]\nrevision = "main"\n[[job]]\nsource = "a/b"\n',
            r"plan.toml:2: \[defaults\]: key 'revision' belongs in a \[\[job\]\] table or a variant, "
            r"not in \[defaults\]$",
        ),
        (
            '[defaults]\nsource = "a/b"\n[[job]]\nsource = "a/b"\n',
            r"plan.toml:2: \[defaults\]: key 'source' belongs in a \[\[job\]\] table, not in \[defaults\]$",
        ),
        (
            '[[job]]\noutput = "x"\n',
            r"plan.toml:1: job 1: key 'source' \(a local path or a Hub repo id\) is required",
        ),
        (
            '[[job]]\nsource = "a/b"\nsource2 = \n',
            r"plan.toml:3: not valid TOML \(Invalid value\); fix the plan",
        ),
        ("[defaults]\n", r"plan.toml: the plan has no jobs; add a \[\[job\]\] table with a 'source'"),
        ('[job_defaults]\nx = 1\n[[job]]\nsource = "a/b"\n', r"plan.toml:1: \[job_defaults\]: unknown table"),
        (  # a key before any table (where cli.md's "the plan's output_root" suggests it) is not a table
            '# converted models\noutput_root = "out"\n[[job]]\nsource = "a/b"\n',
            r"plan.toml:2: key 'output_root' is outside any table: put it under \[defaults\]$",
        ),
        (
            'quant_typo = "nf4"\n[[job]]\nsource = "a/b"\n',
            r"plan.toml:1: key 'quant_typo' is outside any table: a plan has \[defaults\] and \[\[job\]\]",
        ),
        (
            '[[job]]\nsource = "a/b"\noutput = "same"\n\n[[job]]\nsource = "c/d"\noutput = "same"\n',
            r"plan.toml:5: jobs a/b \(.*plan.toml:1\) and c/d would both write 'same'",
        ),
    ],
)
def test_bad_plans_name_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_plan(plan_path)


def test_text_and_json_lists_still_work(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("org/a\norg/b  b-nf4\n")
    plan = load_plan(listing, {"quant_type": "fp4"})
    assert [(j.source, j.output, j.options) for j in plan.jobs] == [
        ("org/a", "org--a", {"quant_type": "fp4"}),
        ("org/b", "b-nf4", {"quant_type": "fp4"}),
    ]
    assert plan.output_root is None
    as_json = tmp_path / "list.json"
    as_json.write_text(json.dumps([{"source": "org/c", "revision": "v1"}]))
    assert load_plan(as_json).jobs[0].revision == "v1"


def test_only_partitions_cover_each_job_once_and_ignore_order() -> None:
    jobs = [Job(f"org/m{k}", f"m{k}") for k in range(23)]
    for n in (1, 2, 3, 8, 30):
        parts = [select_part(jobs, f"{i}/{n}") for i in range(1, n + 1)]
        names = [j.output for part in parts for j in part]
        assert sorted(names) == sorted(j.output for j in jobs)  # each job in exactly one part
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1  # dealt round-robin over a stable ranking
        shuffled = jobs[:]
        random.Random(n).shuffle(shuffled)
        for i in range(1, n + 1):
            assert {j.output for j in select_part(shuffled, f"{i}/{n}")} == {j.output for j in parts[i - 1]}


@pytest.mark.parametrize("bad", ["0/3", "4/3", "3", "a/b", "1/0"])
def test_only_refuses_bad_values(bad: str) -> None:
    with pytest.raises(InputError, match="use I/N with 1 <= I <= N"):
        parse_only(bad)


def test_variants_that_differ_only_in_revision_get_their_own_names(tmp_path: Path) -> None:
    """`variants = [{revision = "main"}, {revision = "dev"}]` named both 'org--branchy-' and refused
    the plan as two jobs writing one folder (docs/ci.md lists revision as a variant key)."""
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(
        '[[job]]\nsource = "org/branchy"\nvariants = [{revision = "main"}, {revision = "refs/pr/1"}]\n'
    )
    jobs = load_plan(plan_path).jobs
    assert [(j.output, j.revision) for j in jobs] == [
        ("org--branchy-main", "main"),
        ("org--branchy-refs-pr-1", "refs/pr/1"),
    ]


def test_a_bad_push_to_is_refused_with_the_plan(tmp_path: Path) -> None:
    """A push_to the Hub refuses was found only after the job's conversion, as a network error."""
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text('[[job]]\nsource = "org/small"\npush_to = "me/bad name"\n')
    with pytest.raises(InputError, match=r"plan.toml:\d+: .*'me/bad name': not a Hub repo id to push to"):
        load_plan(plan_path)


@pytest.mark.parametrize("value", ["5.0", "5", "0"])
def test_int8_threshold_is_accepted_in_a_plan(tmp_path: Path, value: str) -> None:
    """`int8_threshold = 5.0` was refused as "5.0 is not valid: expected float": no plan could set it."""
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(f'[[job]]\nsource = "org/m"\nquant_type = "int8"\nint8_threshold = {value}\n')
    assert load_plan(plan_path).jobs[0].options["int8_threshold"] == float(value)


@pytest.mark.parametrize("value", ["-1.0", "true", "inf"])
def test_a_bad_int8_threshold_is_refused_with_the_plan(tmp_path: Path, value: str) -> None:
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(f'[[job]]\nsource = "org/m"\nint8_threshold = {value}\n')
    with pytest.raises(
        InputError, match=r"plan.toml:3: job 1: key 'int8_threshold': .* use a finite number >= 0"
    ):
        load_plan(plan_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('int8_scale = "gpu"', r"plan.toml:3: job 1: key 'int8_scale': 'gpu' is not valid: use cpu or cuda"),
        ('device = "tpu"', r"plan.toml:3: job 1: key 'device': 'tpu' is not valid: use cpu, cuda or cuda:N"),
        ('device = "cuda:x"', r"plan.toml:3: job 1: key 'device': 'cuda:x' is not valid"),
    ],
)
def test_bad_int8_and_device_values_are_refused_before_any_work(
    tmp_path: Path, line: str, message: str
) -> None:
    """These were accepted by the plan and failed each job at run time (exit 1, not the plan's exit 2)."""
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(f'[[job]]\nsource = "org/m"\n{line}\n')
    with pytest.raises(InputError, match=message):
        load_plan(plan_path)


def test_options_another_method_owns_do_not_name_a_variant(tmp_path: Path) -> None:
    """`{quant_type = "int8", double_quant = false}` got its own folder 'x-int8-no-double-quant' for
    bytes identical to plain int8's: a variant's name, options and key leave out the options its
    method does not own (QuantMethod.own_options), and say so once."""
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(
        '[defaults]\ndouble_quant = false\n[[job]]\nsource = "org/m"\nvariants = [\n'
        '  {quant_type = "int8", blocksize = 128}, {quant_type = "nf4", int8_threshold = 3.0},\n'
        '  {quant_type = "fp4"},\n]\n'
    )
    plan = load_plan(plan_path)
    assert [j.output for j in plan.jobs] == ["org--m-int8", "org--m-nf4", "org--m-fp4"]
    assert plan.jobs[0].options == {"quant_type": "int8"}  # [defaults]' double_quant dropped too
    assert plan.jobs[1].options == {"quant_type": "nf4", "double_quant": False}
    assert plan.warnings == [
        f"{plan_path}:5: job 1, variant 1: blocksize does not apply to quant_type 'int8'; leave it out",
        f"{plan_path}:5: job 1, variant 2: int8_threshold does not apply to quant_type 'nf4'; leave it out",
    ]


@pytest.mark.parametrize(
    "variants",
    [
        '{quant_type = "int8"}, {quant_type = "int8", double_quant = false}',
        '{quant_type = "int8"}, {quant_type = "int8", blocksize = 128, output = "other"}',
        '{quant_type = "nf4"}, {quant_type = "nf4", blocksize = 64, int8_threshold = 2.0}',
        '{skip = ["a"]}, {skip = "a", max_shard_size = "5GB"}',
        '{device = "cpu"}, {device = "cuda", threads = 2}',
    ],
)
def test_variants_of_the_same_conversion_are_refused_naming_both(tmp_path: Path, variants: str) -> None:
    """Two variants resolving to the same effective options (another method's options, convert()'s
    defaults spelled out) converted the same bytes twice under two names: refused before any work,
    naming both variants."""
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(f'[[job]]\nsource = "org/m"\nvariants = [{variants}]\n')
    with pytest.raises(InputError) as err:
        load_plan(plan_path)
    msg = str(err.value)
    assert msg.startswith(f"{plan_path}:1: job 1, variant 2 is the same conversion as job 1, variant 1")
    assert "with the same effective options" in msg
    assert msg.endswith("remove one of them")


def test_jobs_of_the_same_conversion_are_refused_and_different_ones_are_not(tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(
        '[[job]]\nsource = "org/m"\nquant_type = "int8"\n'
        '[[job]]\nsource = "org/m"\nquant_type = "int8"\nint8_scale = "cpu"\noutput = "again"\n'
    )
    same = r"plan.toml:4: job 2 is the same conversion as job 1 \(.*plan.toml:1\)"
    with pytest.raises(InputError, match=same):
        load_plan(plan_path)
    plan_path.write_text(
        '[[job]]\nsource = "org/m"\nquant_type = "int8"\n'
        '[[job]]\nsource = "org/m"\nquant_type = "int8"\nint8_scale = "cuda"\noutput = "cuda"\n'
        '[[job]]\nsource = "org/m"\nquant_type = "int8"\nrevision = "dev"\noutput = "dev"\n'
        '[[job]]\nsource = "org/m"\nquant_type = "int8"\npush_to = "me/m"\noutput = "mirror"\n'
    )
    assert [j.output for j in load_plan(plan_path).jobs] == ["org--m", "cuda", "dev", "mirror"]


def test_the_batch_state_folder_is_no_job_output(tmp_path: Path) -> None:
    """`output = ".quantize-model-batch"` converted into the batch's stamp folder: every job's stamp
    then sat inside that converted folder (and was pushed with it)."""
    from converter.tools.batch import read_list

    plan_path = tmp_path / "plan.toml"
    plan_path.write_text('[[job]]\nsource = "org/m"\noutput = ".quantize-model-batch"\n')
    with pytest.raises(InputError, match=r"plan.toml:3: job 1: output name '.quantize-model-batch' must be"):
        load_plan(plan_path)
    listing = tmp_path / "list.txt"
    listing.write_text("org/m .quantize-model-batch\n")
    with pytest.raises(InputError, match="other than the batch's own state folder"):
        read_list(listing)


def test_a_duplicate_says_which_differences_do_not_count(tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(
        '[[job]]\nsource = "org/m"\nvariants = [{quant_type = "int8", device = "cpu"}, '
        '{quant_type = "int8", blocksize = 32, device = "cuda"}]\n'
    )
    with pytest.raises(InputError) as err:
        load_plan(plan_path)
    assert (
        "with the same effective options (blocksize does not apply to quant_type 'int8'; device does not "
        "change the output), so 'org--m-int8-cpu' and 'org--m-int8-cuda' would be byte-identical"
    ) in str(err.value)


def test_list_items_of_the_same_conversion_are_refused_as_plan_jobs_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A text or JSON list naming one source twice under two output names converted the same bytes twice
    (a TOML plan refuses that before any work); the list goes through the same check, naming both. A
    list's local paths are the working folder's: ./m and its absolute path are one source."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "m"
    src.mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text(f"# twice\n{src} a\n\n./m  b\n")
    with pytest.raises(InputError) as err:
        load_plan(listing, {"quant_type": "nf4"})
    assert str(err.value) == (
        f"{listing}:4: line 4 is the same conversion as line 2 ({listing}:2): ./m with the same effective "
        "options, so 'a' and 'b' would be byte-identical; remove one of them"
    )
    as_json = tmp_path / "list.json"
    as_json.write_text(json.dumps(["org/m", {"source": "org/m", "output": "again"}]))
    same = r"list.json: item 1 is the same conversion as item 0 \(.*list.json\)"
    with pytest.raises(InputError, match=same):
        load_plan(as_json)
    as_json.write_text(json.dumps(["org/m", {"source": "org/m", "output": "dev", "revision": "dev"}]))
    assert [j.output for j in load_plan(as_json).jobs] == ["org--m", "dev"]


def test_plans_and_lists_saved_with_a_utf8_bom_read_as_without(tmp_path: Path) -> None:
    """A file saved by a Windows editor starts with a UTF-8 BOM: it became part of a text list's first
    source ('\\ufefforg/a': "no such file or folder, and not a Hub repo id", the BOM invisible in the
    message), a JSON list was "not valid JSON" and a TOML plan "not valid TOML (Invalid statement)" at
    line 1. Each reads as the same file without the BOM."""
    (tmp_path / "local-model").mkdir()
    as_json = json.dumps(["org/a", {"source": "org/b", "output": "b-nf4"}])
    for name, text in (("plan.toml", PLAN), ("list.txt", "org/a\norg/b  b-nf4\n"), ("list.json", as_json)):
        plain, bom = tmp_path / name, tmp_path / f"bom-{name}"
        plain.write_text(text, encoding="utf-8")
        bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
        want = [(j.source, j.output, j.revision, j.options) for j in load_plan(plain).jobs]
        assert [(j.source, j.output, j.revision, j.options) for j in load_plan(bom).jobs] == want, name
    assert want[0][:2] == ("org/a", "org--a")
