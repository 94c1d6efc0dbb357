"""The embed pipeline as a Dataflow job (built offline with --dry_run) and the GPU worker image's Dockerfile.

No network: the catalogue and the model sit in the in-process GCS emulator (whose fixture also stops
Beam from looking for Google credentials), --project/--region/--temp_location are fake, and the dry run
neither stages nor submits. No Docker engine either: the Dockerfile's structure is checked, not built.
"""
from __future__ import annotations

import json
import os
import sys
import tarfile

import apache_beam
import numpy as np
import pytest

pytest.importorskip("keras")

from apache_beam.io.filesystems import FileSystems

from beam_pipeline import embed
from tests.dockerfile import instructions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = "europe-docker.pkg.dev/fake-project/siamese/siamese-dedup-gpu:0.1.0"
ACCELERATOR = "worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"


def _put(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def test_dataflow_dry_run_writes_the_job_file(gcs_bucket, tiny_model_dir, tmp_path):
    import io

    from PIL import Image

    base = f"{gcs_bucket}/dataflow_test"
    for i in range(2):
        buffer = io.BytesIO()
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(buffer, format="PNG")
        _put(f"{base}/cat/{i}.png", buffer.getvalue())
    for name in ("model.keras", "model_card.json"):
        with open(os.path.join(tiny_model_dir, name), "rb") as f:
            _put(f"{base}/model/{name}", f.read())
    job_file = tmp_path / "job.json"

    summary = embed.run([
        "--input", f"{base}/cat/*.png", "--model_dir", f"{base}/model", "--output", "gs://fake-bucket/work",
        "--runner", "DataflowRunner", "--project", "fake-project", "--region", "europe-west4",
        "--temp_location", "gs://fake-bucket/tmp", "--setup_file", os.path.join(ROOT, "setup.py"),
        "--sdk_container_image", IMAGE, "--experiments=use_runner_v2",
        f"--dataflow_service_options={ACCELERATOR}", "--machine_type", "n1-standard-4",
        "--batch_size", "64", "--dry_run=True", "--dataflow_job_file", str(job_file), "--run_id", "df-dry",
    ])
    assert summary["job_file"] == str(job_file)
    assert (summary["items"], summary["embedded"], summary["failed"]) == (0, 0, 0)
    assert summary["run_id"] == "df-dry" and summary["templates"] == "gs://fake-bucket/work/templates"

    job = json.loads(job_file.read_text())
    assert job["type"] == "JOB_TYPE_BATCH"
    env = job["environment"]
    assert "use_runner_v2" in env["experiments"]
    assert env["serviceOptions"] == [ACCELERATOR]
    [pool] = env["workerPools"]
    assert pool["workerHarnessContainerImage"] == IMAGE
    assert [c["containerImage"] for c in pool["sdkHarnessContainerImages"]] == [IMAGE]
    assert pool["machineType"] == "n1-standard-4"
    assert env["tempStoragePrefix"].startswith("storage.googleapis.com/fake-bucket/tmp/")
    # setup.py's sdist is staged as workflow.tar.gz, beside the pickled main session.
    assert "workflow.tar.gz" in [p["name"] for p in pool["packages"]]
    options = env["sdkPipelineOptions"]["options"]
    assert options["project"] == "fake-project" and options["region"] == "europe-west4"
    assert (options["input"], options["model_dir"], options["batch_size"]) == (f"{base}/cat/*.png", f"{base}/model", 64)
    assert options["setup_file"] == os.path.join(ROOT, "setup.py")

    ours = job["siamese_dedup"]
    assert {"Read", "Decode", "GatherItemsByContent", "SharedContents", "FirstCopies", "Embed", "ToTemplates",
            "WriteTemplates", "WriteFailures"} <= set(ours["transforms"])
    # The sdist Dataflow would install carries the three packages the workers import.
    with tarfile.open(ours["local_files"]["workflow.tar.gz"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    for module in ("beam_pipeline/embed.py", "beam_pipeline/sources/catalogue.py", "beam_pipeline/inference.py",
                   "siamese_core/decode.py", "siamese_core/artefact.py", "trainer/encoder.py", "schemas/tables.py",
                   "setup.py"):
        assert module in names, module


# ---------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_structure():
    import tensorflow as tf

    steps = instructions(os.path.join(ROOT, "Dockerfile"))
    words = [w for w, _ in steps]
    assert set(words) <= {"ARG", "FROM", "ENV", "RUN", "COPY", "WORKDIR", "ENTRYPOINT"}, words
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    # The SDK harness comes from the SDK image of the Beam version and Python that build the job.
    assert args["BEAM_VERSION"] == apache_beam.__version__
    froms = [a for w, a in steps if w == "FROM"]
    assert froms[0] == f"apache/beam_python{python}_sdk:${{BEAM_VERSION}} AS beam_sdk"
    assert froms[-1] == "${CUDA_IMAGE}" and args["CUDA_IMAGE"].startswith("nvidia/cuda:")
    assert "cudnn" in args["CUDA_IMAGE"]
    assert ("COPY", "--from=beam_sdk /opt/apache/beam /opt/apache/beam") in steps
    assert steps[-1] == ("ENTRYPOINT", '["/opt/apache/beam/boot"]')
    final = steps[words.index("FROM", 1):]
    run = " ".join(a for w, a in final if w == "RUN")
    assert f"python{python} -m venv" in run and f"python{python}-venv" in run
    # The package is installed with its pinned Beam, and TensorFlow swapped for its CUDA build.
    assert 'pip install . "apache-beam[gcp]==${BEAM_VERSION}"' in run
    assert "pip uninstall -y tensorflow-cpu" in run
    assert args["TENSORFLOW_VERSION"] == tf.__version__
    assert 'pip install "tensorflow[and-cuda]==${TENSORFLOW_VERSION}"' in run
    # Every package setup.py ships is copied in, with setup.py itself.
    copied = {a.split()[0].rstrip("/") for w, a in final if w == "COPY" and not a.startswith("--from")}
    assert {"trainer", "beam_pipeline", "schemas"} <= copied
    assert any(w == "COPY" and a.split()[0] == "setup.py" for w, a in final)
    # ENV PATH puts the venv's python first: the boot binary runs `python` from PATH.
    assert any(w == "ENV" and "PATH=/opt/venv/bin:$PATH" in a for w, a in final)
    ignored = open(os.path.join(ROOT, ".dockerignore")).read().split()
    assert ".venv" in ignored and ".git" in ignored


def test_gpu_worker_doc_names_the_flags():
    doc = open(os.path.join(ROOT, "docs", "gpu_worker.md"), encoding="utf-8").read()
    for flag in ("--sdk_container_image", "--experiments=use_runner_v2",
                 "--dataflow_service_options=\"worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver\"",
                 "--machine_type", "--dry_run=True", "--dataflow_job_file", "docker build", "--setup_file"):
        assert flag in doc, flag
