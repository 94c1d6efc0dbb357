# syntax=docker/dockerfile:1
# GPU worker image for the Beam pipelines on Dataflow (Runner v2): a CUDA base, Python 3.11, the Beam SDK
# harness (its boot binary is the entrypoint Dataflow starts), TensorFlow with CUDA, and this package.
# How to build, push and use it: docs/gpu_worker.md. Build context: the repository root.
#
# BEAM_VERSION must equal the apache-beam that submits the job, and the SDK image's Python (3.11) the
# image's Python (tests/beam_pipeline/test_dataflow.py checks both against the installed SDK).
ARG BEAM_VERSION=2.77.0
ARG CUDA_IMAGE=nvidia/cuda:12.5.1-cudnn-runtime-ubuntu22.04

FROM apache/beam_python3.11_sdk:${BEAM_VERSION} AS beam_sdk

FROM ${CUDA_IMAGE}
ARG BEAM_VERSION
ARG TENSORFLOW_VERSION=2.20.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11 (the SDK harness runs `python` from PATH, the same minor version as the submitting SDK).
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common ca-certificates curl \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The Beam SDK harness: boot binary and its files, from the SDK image of the same Beam version.
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam

# This package and its dependencies. setup.py asks for tensorflow-cpu on x86_64 (small, for CPU workers
# and laptops); on the GPU image it is swapped for the same TensorFlow with its CUDA libraries.
WORKDIR /opt/siamese-dedup
COPY setup.py README.md ./
COPY siamese_core ./siamese_core
COPY trainer ./trainer
COPY beam_pipeline ./beam_pipeline
COPY schemas ./schemas
RUN pip install --upgrade pip \
 && pip install . "apache-beam[gcp]==${BEAM_VERSION}" \
 && pip uninstall -y tensorflow-cpu \
 && pip install "tensorflow[and-cuda]==${TENSORFLOW_VERSION}" \
 && python -c "import apache_beam, tensorflow, beam_pipeline.embed; print(apache_beam.__version__, tensorflow.__version__)"

# Dataflow starts the SDK harness through this entrypoint.
ENTRYPOINT ["/opt/apache/beam/boot"]
