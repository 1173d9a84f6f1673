# syntax=docker/dockerfile:1
# The one AutoGLM image: the operator (autoglm operator), the model server (autoglm serve), its agent
# sidecar (autoglm agent) and every pipeline step (autoglm pipeline STEP) run from it.
#
#   docker build -t autoglm:0.1.0 .                                  # CPU: torch's CPU build, llama.cpp
#   docker build --build-arg VARIANT=cuda -t autoglm:0.1.0-cuda .    # CUDA: torch's CUDA build
#
# Everything is installed at the versions requirements.lock pins (the same as `make test` tests), as
# the non-root user 10001 that the chart's securityContext names, with a root filesystem the pods
# mount read-only: caches go to /tmp (an emptyDir in every pod).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtual environment in /opt/autoglm ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
# cpu or cuda: which torch build, and whether llama.cpp (the CPU engine for GGUF variants) is built.
ARG VARIANT=cpu
# Where torch's builds are published; VARIANT picks the folder (cpu, or the CUDA one).
ARG TORCH_INDEX=https://download.pytorch.org/whl
ARG TORCH_CUDA=cu128
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A compiler and CMake only to build llama-cpp-python from source (the CPU variant).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential=12.9 cmake=3.25.* \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml requirements.lock README.md ./
COPY crds/autoglm_api crds/autoglm_api
COPY core/autoglm_core core/autoglm_core
COPY modeling/autoglm_modeling modeling/autoglm_modeling
COPY operator/autoglm_operator operator/autoglm_operator
COPY pipelines/autoglm_pipelines pipelines/autoglm_pipelines
COPY inference/autoglm_inference inference/autoglm_inference
COPY feedback/autoglm_feedback feedback/autoglm_feedback
COPY feedback/feature_repo feedback/feature_repo
# pip first, then torch (pinned, from its own index: PyPI's Linux torch is the CUDA build), then the
# project from the lock, then llama.cpp on the CPU variant.
RUN python -m venv /opt/autoglm \
 && /opt/autoglm/bin/pip install "pip==26.3" \
 && /opt/autoglm/bin/pip install --index-url "${TORCH_INDEX}/$([ "${VARIANT}" = cuda ] && echo "${TORCH_CUDA}" || echo cpu)" "torch==2.13.0" \
 && grep -iE '^(hatchling|packaging|pathspec|pluggy|trove-classifiers)==' requirements.lock > /tmp/build.txt \
 && /opt/autoglm/bin/pip install -r /tmp/build.txt \
 && /opt/autoglm/bin/pip install --no-build-isolation -c requirements.lock ".[ml,serve,kube,feedback,postgres]" \
 && if [ "${VARIANT}" = cpu ]; then \
      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
      /opt/autoglm/bin/pip install "llama-cpp-python==0.3.36" "diskcache==5.6.3"; \
    fi \
 && /opt/autoglm/bin/autoglm --help > /dev/null

# -- runtime --------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="autoglm" \
      org.opencontainers.image.description="AutoGLM: operator, model server, agent and pipeline steps" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# gcc and libgomp: AutoGLM's CPU kernel (autoglm_modeling/csrc/gemm.c) is compiled on first use.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc=4:12.2.* libgomp1=12.2.* \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 autoglm \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin autoglm
COPY --from=build /opt/autoglm /opt/autoglm
ENV PATH=/opt/autoglm/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HUB_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AUTOGLM_VARIANT=${VARIANT}
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["autoglm"]
CMD ["--help"]
