"""Offline stand-ins for the Ray base images, built once per machine and kept as named images.

Docker Hub is out of reach where the tests run. `rootfs_image` makes a Debian 12 root file system
with debootstrap and imports it; `ray_image` builds ray-standin.Dockerfile on it, with pip going
out over the host network. docker/*.Dockerfile take the result as `--build-arg RAY_IMAGE=...`.
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import tempfile
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOTFS_IMAGE = "quantbench-test/debian12-minbase:latest"
RAY_IMAGE = "quantbench-test/ray-standin:2.60.0-py311"
# Index URL of the torch wheel inside the stand-in (see ray-standin.Dockerfile).
TORCH_INDEX_URL = "file:///opt/torch-index"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class StandinUnavailable(Exception):
    """Why a stand-in cannot be built on this machine (the test skips with it)."""


def image_exists(name: str) -> bool:
    found = subprocess.run(["docker", "image", "inspect", name], capture_output=True)
    return found.returncode == 0


def _run(command: list[str], what: str, timeout_s: float, **options) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, **options)
    if done.returncode != 0:
        raise RuntimeError(
            f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )


def rootfs_image() -> str:
    """Debian 12 minbase with Python 3.11, imported as an image (about a minute on 2 cores)."""
    if image_exists(ROOTFS_IMAGE):
        return ROOTFS_IMAGE
    if shutil.which("debootstrap") is None:
        raise StandinUnavailable("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise StandinUnavailable("debootstrap needs root")
    with tempfile.TemporaryDirectory(prefix="qb-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(root),
                DEBIAN_MIRROR,
            ],
            "debootstrap",
            900,
        )
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        _run(["docker", "import", "-", ROOTFS_IMAGE], "docker import", 600, stdin=tar.stdout)
        tar.wait()
    return ROOTFS_IMAGE


def torch_wheel() -> Path:
    """The CPU build of torch in the local wheel folder that pip's configuration names."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    listed = subprocess.run(["pip", "config", "list"], capture_output=True, text=True).stdout
    folders += [
        line.split("=", 1)[1].strip("'") for line in listed.splitlines() if "find-links" in line
    ]
    for folder in map(Path, folders):
        wheels = sorted(folder.glob("torch-2.13.0+cpu-cp311-*.whl")) if folder.is_dir() else []
        if wheels:
            return wheels[0]
    raise StandinUnavailable(
        f"no torch 2.13.0+cpu wheel in pip's find-links folders ({folders or 'none'})"
    )


def ca_bundle() -> Path:
    for name in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if name and Path(name).is_file():
            return Path(name)
    raise StandinUnavailable("no CA bundle to give pip inside the build (PIP_CERT)")


def ray_image() -> str:
    """The stand-in for rayproject/ray:2.60.0-py311-cpu (a few minutes on 2 cores, then cached)."""
    if image_exists(RAY_IMAGE):
        return RAY_IMAGE
    rootfs = rootfs_image()
    wheel = torch_wheel()
    with tempfile.TemporaryDirectory(prefix="qb-standin-") as tmp:
        context = Path(tmp)
        shutil.copy(HERE / "ray-standin.Dockerfile", context / "Dockerfile")
        shutil.copy(ca_bundle(), context / "ca-bundle.crt")
        index = context / "torch-index" / "torch"
        index.mkdir(parents=True)
        os.link(wheel, index / wheel.name) if _same_device(wheel, index) else shutil.copy(
            wheel, index
        )
        # A file:// index is read from index.html, not from the folder's listing.
        link = urllib.parse.quote(wheel.name)
        (index / "index.html").write_text(f'<a href="{link}">{html.escape(wheel.name)}</a>\n')
        _run(
            [
                "docker",
                "build",
                "--network",
                "host",
                "--build-arg",
                f"ROOTFS_IMAGE={rootfs}",
                "-t",
                RAY_IMAGE,
                str(context),
            ],
            "building the Ray stand-in",
            1200,
        )
    return RAY_IMAGE


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev
