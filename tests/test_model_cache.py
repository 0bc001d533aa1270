"""The prepared-model cache key of a hub model pins the commit its revision resolves to.

No network: a Hugging Face cache folder is laid out here as huggingface_hub lays it out
(models--ORG--NAME/refs/main names a commit, snapshots/<commit>/ holds its files), and the jobs
run with HF_HUB_OFFLINE=1. HF_HUB_CACHE and HF_HUB_OFFLINE are read when huggingface_hub is
imported: each look runs in a process of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO, rt_job, write_job

REPO_ID = "quantbench-test/tiny-bert"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40

# Plans the job, prepares its model and builds a variant's result, as a sweep does; prints what
# the cache and the result say of the model.
LOOK = """
import json, sys
from runner import model_cache, models
from runner.plan import plan_job
from runner.sweep import variant_work
from runner.work import base_result

plan = plan_job(sys.argv[1])
folder, info = models.prepare_model(plan.spec)
result = base_result(variant_work(plan, folder, info, set())[0], "skipped")
print(json.dumps({"key": model_cache.model_key(plan.spec), "folder": str(folder),
                  "cached": info["cached"], "model": result.model}))
"""


def point_main_at(hub_cache: Path, commit: str, model: Path) -> None:
    """refs/main names commit, whose snapshot holds the model's files."""
    repo = hub_cache / f"models--{REPO_ID.replace('/', '--')}"
    if not (repo / "snapshots" / commit).is_dir():
        shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def look(job: Path, hub_cache: Path, tmp_path: Path) -> dict:
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub_cache),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", LOOK, str(job)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_commits_of_a_hub_model_give_two_cache_keys_and_results_name_the_commit(
    tmp_path, tiny_model
):
    hub_cache = tmp_path / "hub"
    job = write_job(
        tmp_path / "jobs",
        rt_job(tiny_model).replace(f"{{path: {tiny_model}}}", f"{{hub: {REPO_ID}}}"),
    )
    point_main_at(hub_cache, COMMIT_A, tiny_model)
    first = look(job, hub_cache, tmp_path)
    again = look(job, hub_cache, tmp_path)
    point_main_at(hub_cache, COMMIT_B, tiny_model)  # main moved on the hub
    moved = look(job, hub_cache, tmp_path)

    assert first["model"]["commit"] == COMMIT_A and moved["model"]["commit"] == COMMIT_B
    assert first["key"] != moved["key"] and first["folder"] != moved["folder"]
    assert Path(first["folder"]).name == first["key"]
    assert again["key"] == first["key"] and again["cached"] and not first["cached"]
    assert again["model"]["commit"] == COMMIT_A  # read back from the cache entry
    assert first["model"]["source"] == f"hub:{REPO_ID}"


def test_a_local_model_records_no_commit(tmp_path, tiny_model):
    from runner import models
    from runner.plan import plan_job

    plan = plan_job(write_job(tmp_path / "jobs", rt_job(tiny_model)))
    _, info = models.prepare_model(plan.spec)
    assert "commit" not in info


def model_key_of(tmp_path, model: Path) -> str:
    from runner.model_cache import model_key
    from runner.plan import plan_job

    return model_key(plan_job(write_job(tmp_path / "jobs", rt_job(model))).spec)


def test_a_local_folders_key_hashes_only_the_files_the_model_loads(tmp_path, tiny_model):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    key = model_key_of(tmp_path, folder)
    # Files from_pretrained never reads: they do not change the key (nor are they read).
    (folder / "train.tar").write_bytes(os.urandom(1 << 20))
    (folder / "README.md").write_text("notes")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out").write_bytes(b"log")
    assert model_key_of(tmp_path, folder) == key
    # Every file it reads does.
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        with (folder / name).open("r+b") as changed:  # JSON: a space more; weights: a bit
            if name.endswith(".json"):
                changed.seek(0, os.SEEK_END)
                changed.write(b" ")
            else:
                changed.seek(-1, os.SEEK_END)
                last = changed.read(1)[0]
                changed.seek(-1, os.SEEK_END)
                changed.write(bytes([last ^ 1]))
        assert model_key_of(tmp_path, folder) != key, name
        key = model_key_of(tmp_path, folder)
