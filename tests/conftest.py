"""Shared fixtures: tiny models built here, real rows from ../shared/data, private caches.

Nothing is downloaded: the model is a random BertConfig saved with save_pretrained, and its
tokenizer is a WordPiece vocabulary written from the rt-polarity sentences themselves.
"""

from __future__ import annotations

import collections
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RT_POLARITY = DATA / "rt-polarity"
SMSA = DATA / "smsa"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Each test session prepares models into its own cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "quantbench-cache"
    monkeypatch.setenv("QUANTBENCH_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def private_timing_lock(tmp_path, monkeypatch):
    """A timing lock of the test's own, for every test and the Ray clusters and processes it starts
    (they inherit it): another quantbench run timing on this machine must not hold it up (a
    shared lock made one run wait 356 s on a busy machine)."""
    from runner import locks

    monkeypatch.setenv(locks.TIMING_LOCK_VARIABLE, str(tmp_path / "timing.lock"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random Llama and its tokenizer, saved once per test module (lm_models)."""
    from lm_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("llama"))


def corpus_lines(paths: list[Path], per_file: int = 2000) -> list[str]:
    return [
        line.split("\t")[0]
        for path in paths
        for line in path.read_text(encoding="utf-8").splitlines()[:per_file]
    ]


def build_tokenizer(folder: Path, vocab_size: int = 2000, corpus: list[str] | None = None):
    from transformers import BertTokenizerFast

    words = collections.Counter()
    for line in corpus or corpus_lines(
        [RT_POLARITY / "rt-polarity.pos", RT_POLARITY / "rt-polarity.neg"]
    ):
        words.update(line.split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
        w for w, _ in words.most_common(vocab_size)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(
        vocab={word: i for i, word in enumerate(dict.fromkeys(vocab))}, do_lower_case=True
    )
    assert len(tokenizer) > 100, "the tokenizer did not take the vocabulary"
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_bert(
    folder: Path,
    labels: list[str],
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    corpus: list[str] | None = None,
    initializer_range: float = 0.02,
) -> Path:
    """A random-initialised BERT classifier with the given label names, saved with
    save_pretrained."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = build_tokenizer(folder, corpus=corpus)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=128,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        initializer_range=initializer_range,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


# A tiny BERT with one layer made hard to quantize, for the sensitivity study's tests.
HARD_BERT_LABELS = ["negative", "positive"]
HARD = "bert.encoder.layer.1.output.dense"
# Times the layer's max |w|: its per-tensor int8 step then swamps every other weight.
OUTLIER_FACTOR = 50.0
DEAD_INPUT = 7  # the intermediate unit the outliers multiply, silenced so FP32 ignores them
HARD_SENTENCES = 64  # per class


def hard_bert_sentences() -> tuple[list[str], list[int]]:
    """The first HARD_SENTENCES sentences of each rt-polarity class, with their label index."""
    texts, gold = [], []
    for label, file in enumerate(["rt-polarity.neg", "rt-polarity.pos"]):
        lines = (RT_POLARITY / file).read_text(encoding="utf-8").splitlines()[:HARD_SENTENCES]
        texts += lines
        gold += [label] * len(lines)
    return texts, gold


def build_hard_bert(folder: Path) -> Path:
    """A 2-layer tiny BERT whose HARD layer int8-dynamic ruins while FP32 computes as before,
    its head centred so that FP32's predictions are split between the classes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from runner.evaluate import tokenize_batches

    build_tiny_bert(folder, HARD_BERT_LABELS, layers=2, initializer_range=0.2)
    texts, _ = hard_bert_sentences()
    batches = tokenize_batches(AutoTokenizer.from_pretrained(folder), texts, 16, 32, "cpu")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    _plant_outliers(model)
    _centre_decisions(model, batches)
    model.save_pretrained(folder)
    return folder


def _plant_outliers(model) -> None:
    # Three huge weights on an input that is always 0 (its intermediate unit has no weights and no
    # bias: GELU(0) = 0): FP32 computes as before, but int8-dynamic's per-tensor scale becomes
    # 50 max|w| / 127.5, rounding the layer's other weights to a few codes.
    import torch

    layer = model.get_submodule(HARD)
    intermediate = model.get_submodule(HARD.replace("output", "intermediate"))
    with torch.no_grad():
        peak = layer.weight.abs().max()
        layer.weight[[3, 10, 20], DEAD_INPUT] = (
            torch.tensor([1.0, -1.0, 1.0]) * OUTLIER_FACTOR * peak
        )
        intermediate.weight[DEAD_INPUT] = 0.0
        intermediate.bias[DEAD_INPUT] = 0.0


def _centre_decisions(model, batches) -> None:
    # A random head puts nearly every sentence in one class; centring its bias on the sample's
    # median logit difference splits FP32's predictions, so a quantization error can flip them.
    import torch

    with torch.inference_mode():
        logits = torch.cat([model(**batch).logits for batch in batches])
    with torch.no_grad():
        model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Binary classifier, label names negative/positive."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), ["negative", "positive"])


@pytest.fixture(scope="session")
def tiny_model_3(tmp_path_factory) -> Path:
    """Three labels in the published model's order: LABEL_0 positive, LABEL_1 neutral, LABEL_2
    negative."""
    return build_tiny_bert(
        tmp_path_factory.mktemp("tiny-bert-3"), ["LABEL_0", "LABEL_1", "LABEL_2"]
    )


@pytest.fixture
def causal_lm_task():
    """collect finds a job's task in TASKS: causal-lm is registered with its comparison."""
    from runner.tasks import TASKS
    from runner.tasks.causal_lm import compare

    assert TASKS["causal-lm"].rows is compare.ROWS


@pytest.fixture
def ray_temp_dir():
    """Ray's own temp folder for the clusters a test starts (short: Ray's socket paths are
    limited)."""
    folder = tempfile.mkdtemp(prefix="qbray-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def write_job(folder: Path, text: str, name: str = "job.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def rt_job(
    model: Path,
    extra: str = "",
    name: str = "tiny-rt",
    variants: str = "[fp32-cpu, int8-dynamic-cpu]",
    n: int = 24,
) -> str:
    return f"""
name: {name}
model: {{path: {model}}}
dataset:
  format: lines
  path: {RT_POLARITY}
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  label_map: {{pos: positive, neg: negative}}
  sample: {{n: {n}, seed: 1}}
  max_length: 32
evaluation: {{batch_size: 4, warmup_passes: 1, timed_passes: 8}}
variants: {variants}
{extra}
"""


def smsa_job(
    model: Path,
    label_map: str,
    rest: str = "variants: [fp32-cpu]",
    name: str = "smsa-tiny",
    n: int = 50,
    seed: int = 0,
    dataset_extra: str = "",
) -> str:
    """A job on the real SmSA test rows (tab-separated, no header row, three labels); `rest` follows
    the dataset."""
    return f"""
name: {name}
model: {{path: {model}}}
dataset:
  format: tsv
  path: {SMSA / "test_preprocess.tsv"}
  header: false
  label_map: {label_map}
  sample: {{n: {n}, seed: {seed}}}
  {dataset_extra}
{rest}
"""


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """quantbench's command line in this process: (exit code, stdout, stderr)."""
    from runner.cli import main

    code = main(list(map(str, args)))
    out = capsys.readouterr()
    return code, out.out, out.err


def check_refused(capsys, tmp_path, job_text: str, *expected: str) -> str:
    """validate and run both exit 2 naming the job file and the expected words; run writes
    nothing."""
    job = write_job(tmp_path / "jobs", job_text)
    code, _, err = run_cli(capsys, "validate", job)
    assert code == 2, err
    assert job.name in err and "Traceback" not in err, err
    for words in expected:
        assert words in err, f"{words!r} not in {err!r}"
    results = tmp_path / "results"
    code, _, err_run = run_cli(capsys, "run", job, "--results", results)
    assert code == 2 and err_run == err, err_run
    assert not results.exists()
    return err


def variant_json(task) -> dict:
    """run_variant in this process, its result as the JSON its file would hold."""
    from runner.worker import run_variant

    return run_variant(task).to_json()


def ok_result_head(job: str, variant: str) -> dict:
    """The fields a hand-made ok result starts with: its job, and its variant with what it names."""
    precision, device = variant.rsplit("-", 1)
    return {
        "schema_version": 1,
        "job": job,
        "variant": variant,
        "precision": precision,
        "device": device,
        "status": "ok",
        "error": None,
        "warnings": [],
    }


def typed(results) -> list:
    """Result dicts (a result file's JSON) as the typed results collect reads, each checked as a
    file is."""
    from runner.results import read_json_result

    return [read_json_result(result) for result in results]


def labelled(gold, labels) -> dict:
    """A classifier's task and its configuration for a work item built by hand: the model's label
    names and the sample's gold labels (as the plan gives them, the label map the identity)."""
    from runner.tasks import TASKS
    from runner.tasks.classification.labels import Labels

    names = list(labels)
    return {
        "task": TASKS["classification"],
        "task_config": Labels(names, {name: name for name in names}, list(gold)),
    }
