# An offline stand-in for rayproject/ray:2.60.0-py311-cpu, for tests/test_containers.py only.
# Docker Hub is out of reach where the tests run, so the base is a Debian 12 root file system
# (debootstrap, then docker import) with what the real image gives docker/*.Dockerfile: Python 3.11
# (Debian's 3.11.2) on PATH with pip, Ray 2.60.0, and the `ray` user (uid 1000, gid 100).
ARG ROOTFS_IMAGE=quantbench-test/debian12-minbase:latest
FROM ${ROOTFS_IMAGE}

# pip reaches the registry through this machine's network and trusts what its CA bundle trusts.
COPY ca-bundle.crt /etc/ssl/certs/quantbench-build-ca.crt
# PyPI stays an extra index, for torch's own dependencies (PyTorch's real index carries them).
ENV PIP_CERT=/etc/ssl/certs/quantbench-build-ca.crt \
    PIP_EXTRA_INDEX_URL=https://pypi.org/simple \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PATH=/home/ray/anaconda3/bin:$PATH \
    HOME=/home/ray

RUN useradd --uid 1000 --gid 100 --create-home --shell /bin/bash ray \
    && python3 -m venv /home/ray/anaconda3 \
    && chown -R 1000:100 /home/ray

# The CPU build of torch as a one-package index: docker/cpu.Dockerfile installs it from
# --build-arg TORCH_INDEX_URL=file:///opt/torch-index instead of PyTorch's own index.
COPY torch-index/ /opt/torch-index/

USER 1000:100
RUN pip install --no-cache-dir "ray[default]==2.60.0"
WORKDIR /home/ray
