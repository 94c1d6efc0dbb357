"""The nightly run's deployment files, checked offline: the Flex Template (metadata.json, Dockerfile, main.py),
the Cloud Scheduler request body in docs/nightly.md, the systemd units (the timer's, and the service that
stays up) and the cron line.

No Docker engine, gcloud or network: the Dockerfile's structure is checked, not built; main.py runs with
nightly.run replaced, and the summary job it hands the launcher is built on Beam's DataflowRunner with a
local --template_location against the in-process Cloud Storage emulator (nothing is submitted).
"""
from __future__ import annotations

import argparse
import configparser
import json
import logging
import os
import re
import runpy
import shlex
import signal
import sys

import apache_beam
import pytest

from beam_pipeline import cli, nightly
from beam_pipeline.clustering import KEEPER_POLICIES, LINKAGES
from tests.dockerfile import instructions
from tests.scripts import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLEX = os.path.join(ROOT, "deploy", "flex_template")
MAIN_PY = os.path.join(FLEX, "main.py")
SYSTEMD = os.path.join(ROOT, "deploy", "systemd")
SERVICE = "siamese-dedup-nightly.service"
CRON = os.path.join(ROOT, "deploy", "cron", "siamese-dedup-nightly.cron")

# The Flex Template metadata format (Dataflow API v1b3 TemplateMetadata / ParameterMetadata).
TEMPLATE_FIELDS = {"name", "description", "parameters", "streaming", "supportsAtLeastOnce", "supportsExactlyOnce",
                   "defaultStreamingMode"}
PARAMETER_FIELDS = {"name", "label", "helpText", "isOptional", "regexes", "paramType", "customMetadata",
                    "groupName", "parentName", "parentTriggerValues", "enumOptions", "defaultValue", "hiddenUi"}
PARAM_TYPES = {"DEFAULT", "TEXT", "GCS_READ_BUCKET", "GCS_WRITE_BUCKET", "GCS_READ_FILE", "GCS_WRITE_FILE",
               "GCS_READ_FOLDER", "GCS_WRITE_FOLDER", "PUBSUB_TOPIC", "PUBSUB_SUBSCRIPTION", "BIGQUERY_TABLE",
               "JAVASCRIPT_UDF_FILE", "SERVICE_ACCOUNT", "MACHINE_TYPE", "KMS_KEY_NAME", "WORKER_REGION",
               "WORKER_ZONE", "BOOLEAN", "ENUM", "NUMBER"}
# Values each parameter's patterns must accept, and must refuse.
SAMPLES = {
    "catalogue": (["gs://my-bucket/catalogue/**/*.jpg", "gs://b-1.x/photos/*.png", "gs://my_bucket/shards/*.tfrecord"],
                  ["/srv/catalogue/*.jpg", "gs://my-bucket", "gs://my-bucket/", "gs://My-Bucket/a/*.jpg",
                   "s3://b/x/*.jpg", "gs://my-bucket/a b/*.jpg"]),
    "model_dir": (["gs://my-bucket/model", "gs://my-bucket/models/v2/", "gs://my-bucket"],
                  ["/srv/model", "model", "gs://", "gs://ab c/model", "https://storage.googleapis.com/b/model"]),
    "state": (["gs://my-bucket/dedup_state", "gs://my-bucket/a/b/state/"],
              ["/var/lib/state", "gs://-bucket/state", "gs://b/state"]),
    "run_date": (["2026-12-03", "2027-01-31"], ["2026-1-3", "20261203", "2026-12-03T02:00", "today", ""]),
    "threshold": (["0.9", "0.875", "1", "1.0", "0", "0.5"], ["1.5", "-0.1", ".9", "0.9.1", "high", "2", ""]),
    "recalibrate": (["true", "false"], ["True", "yes", "1", ""]),
    "linkage": (list(LINKAGES), ["average", "Complete", ""]),
    "keeper_policy": ([p for p in KEEPER_POLICIES if p != "column"],
                      # column needs --keeper_table/--keeper_column, which the template does not offer
                      ["column", "largest", ""]),
    "engine": (["auto", "beam", "local"], ["Local", "dataflow", ""]),
    "local_max_items": (["5000", "1", "200000"], ["0", "-5", "5k", "1.5", ""]),
    "rehash": (["true", "false"], ["no", "0", ""]),
    "break_lock": (["true", "false"], ["TRUE", "on", ""]),
}


def _metadata() -> dict:
    with open(os.path.join(FLEX, "metadata.json"), encoding="utf-8") as f:
        return json.load(f)


def _params() -> dict[str, dict]:
    return {p["name"]: p for p in _metadata()["parameters"]}


def _parser_flags() -> dict[str, argparse.Action]:
    """nightly's flags by name (without the dashes), --help and the service's (--serve_at) left out."""
    return {a.option_strings[0][2:]: a for a in nightly.build_parser()._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)
            and a.option_strings[0][2:] not in nightly.SERVICE_FLAGS}


# ---------------------------------------------------------------------------------------------- metadata.json


def test_metadata_is_flex_template_metadata():
    meta = _metadata()
    assert set(meta) <= TEMPLATE_FIELDS, set(meta) - TEMPLATE_FIELDS
    assert isinstance(meta["name"], str) and meta["name"].strip()
    assert isinstance(meta["description"], str) and meta["description"].strip()
    params = meta["parameters"]
    assert isinstance(params, list) and params
    names = [p["name"] for p in params]
    assert len(names) == len(set(names)), names
    for p in params:
        assert set(p) <= PARAMETER_FIELDS, (p["name"], set(p) - PARAMETER_FIELDS)
        for field in ("name", "label", "helpText"):  # required by the format
            assert isinstance(p.get(field), str) and p[field].strip(), (p.get("name"), field)
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", p["name"]), p["name"]
        assert isinstance(p.get("isOptional", False), bool), p["name"]
        assert p.get("paramType", "DEFAULT") in PARAM_TYPES, p["name"]
        regexes = p.get("regexes", [])
        assert isinstance(regexes, list) and all(isinstance(r, str) and r for r in regexes), p["name"]


def test_metadata_parameters_are_the_nightly_flags():
    params, flags = _params(), _parser_flags()
    # Every parameter is a flag of `siamese-dedup nightly`, and every flag a user sets is a parameter.
    assert set(params) <= set(flags), set(params) - set(flags)
    assert set(flags) <= set(params), f"nightly flags missing from metadata.json: {sorted(set(flags) - set(params))}"
    for name, action in flags.items():
        optional = params[name].get("isOptional", False)
        # A required flag is a required parameter; an optional flag must not be demanded by Dataflow.
        assert optional is (not action.required), (name, action.required, optional)


def test_metadata_regexes_compile_and_accept_what_the_parser_accepts():
    params, flags = _params(), _parser_flags()
    assert set(SAMPLES) == set(params), "a sample table per parameter"
    for name, p in params.items():
        patterns = [re.compile(r) for r in p["regexes"]]
        assert patterns, f"{name}: no regex"
        for r in p["regexes"]:  # whole-value patterns, whatever matching the service does
            assert r.startswith("^") and r.endswith("$"), (name, r)
        good, bad = SAMPLES[name]
        for value in good:
            assert all(pt.search(value) for pt in patterns), (name, value)
        for value in bad:
            assert not all(pt.search(value) for pt in patterns), (name, value)
        action = flags[name]
        if action.choices:  # exactly the parser's choices pass
            for choice in action.choices:
                assert all(pt.search(choice) for pt in patterns) or (name, choice) == ("keeper_policy", "column"), \
                    (name, choice)
    # What the patterns let through, the parser takes (types, dates, choices).
    parser = nightly.build_parser()
    for value in SAMPLES["run_date"][0]:
        assert parser.parse_args(_required() + ["--run_date", value]).run_date == value
    for value in SAMPLES["threshold"][0]:
        assert 0.0 <= parser.parse_args(_required() + ["--threshold", value]).threshold <= 1.0
    for value in SAMPLES["keeper_policy"][0]:
        assert value in KEEPER_POLICIES
    # The date pattern is the brief's, and the parser refuses what it refuses.
    with pytest.raises(SystemExit):
        parser.parse_args(_required() + ["--run_date", "2026-13-45"])


def _required() -> list[str]:
    return ["--catalogue", "gs://my-bucket/c/*.jpg", "--model_dir", "gs://my-bucket/model", "--state",
            "gs://my-bucket/state"]


# ---------------------------------------------------------------------------------------------- Dockerfile


def _env(steps) -> dict[str, str]:
    env = {}
    for word, args in steps:
        if word == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def _repo_source(container_path: str, steps) -> str | None:
    """The repository path a container path was copied from (COPY SRC DST, relative to WORKDIR), or None."""
    workdir = "/"
    for word, args in steps:
        if word == "WORKDIR":
            workdir = args if args.startswith("/") else os.path.join(workdir, args)
        elif word == "COPY" and not args.startswith("--from"):
            *sources, dest = args.split()
            dest_abs = os.path.normpath(dest if dest.startswith("/") else os.path.join(workdir, dest))
            for src in sources:
                if dest.endswith("/"):  # into a directory: same base name
                    if os.path.join(dest_abs, os.path.basename(src)) == container_path:
                        return src
                elif dest_abs == container_path:
                    return src
                elif container_path.startswith(dest_abs + "/"):  # a file inside a copied directory
                    return os.path.join(src, container_path[len(dest_abs) + 1:])
    return None


def test_flex_dockerfile_structure():
    steps = instructions(os.path.join(FLEX, "Dockerfile"))
    words = [w for w, _ in steps]
    assert set(words) <= {"ARG", "FROM", "ENV", "RUN", "COPY", "WORKDIR"}, words  # the launcher stays the entrypoint
    args = dict(a.split("=", 1) for w, a in steps if w == "ARG" and "=" in a)
    python = f"{sys.version_info.major}{sys.version_info.minor}"
    [base] = [a for w, a in steps if w == "FROM"]
    assert base == f"gcr.io/dataflow-templates-base/python{python}-template-launcher-base:${{LAUNCHER_TAG}}"
    assert args["LAUNCHER_TAG"] and args["LAUNCHER_TAG"] != "latest"  # pinned
    # The Beam that submits the stage jobs is the installed one, and the GPU worker image's.
    assert args["BEAM_VERSION"] == apache_beam.__version__
    root_args = dict(a.split("=", 1) for w, a in instructions(os.path.join(ROOT, "Dockerfile"))
                     if w == "ARG" and "=" in a)
    assert args["BEAM_VERSION"] == root_args["BEAM_VERSION"]
    runs = " && ".join(a for w, a in steps if w == "RUN")
    assert re.search(r'pip install \. "apache-beam\[gcp\]==\$\{BEAM_VERSION\}"', runs), runs
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        assert '"apache-beam[gcp]' in f.read()  # the extra the image pins is the one setup.py asks for

    env = _env(steps)
    assert "FLEX_TEMPLATE_PYTHON_REQUIREMENTS_FILE" not in env  # nothing installed at launch time
    py_file = _repo_source(env["FLEX_TEMPLATE_PYTHON_PY_FILE"], steps)
    assert py_file == "deploy/flex_template/main.py" and os.path.isfile(os.path.join(ROOT, py_file))
    setup_file = _repo_source(env["FLEX_TEMPLATE_PYTHON_SETUP_FILE"], steps)
    assert setup_file == "setup.py"
    # setup.py sits beside the packages it ships, in the image as in the repository.
    setup_dir = os.path.dirname(env["FLEX_TEMPLATE_PYTHON_SETUP_FILE"])
    for package in ("siamese_core", "trainer", "beam_pipeline", "schemas"):
        assert _repo_source(f"{setup_dir}/{package}/__init__.py", steps) == f"{package}/__init__.py", package
    # The build context's .dockerignore keeps every copied source.
    ignored = [line.strip() for line in open(os.path.join(ROOT, ".dockerignore")) if line.strip()
               and not line.startswith("#")]
    for word, a in steps:
        if word == "COPY":
            for src in a.split()[:-1]:
                assert not any(src == pattern or src.startswith(pattern.rstrip("/") + "/") for pattern in ignored), src


# ---------------------------------------------------------------------------------------------- main.py


def _load_main():
    return load_script(os.path.relpath(MAIN_PY, ROOT), "siamese_dedup_flex_main")


def test_main_passes_the_flags_to_nightly_run(monkeypatch):
    calls = []
    monkeypatch.setattr(nightly, "run", lambda argv=None: calls.append(argv) or {"run_date": "2026-12-03"})
    argv = ["--catalogue=gs://my-bucket/c/**/*.jpg", "--model_dir=gs://my-bucket/model", "--state=gs://my-bucket/s",
            "--threshold=0.9", "--runner=DataflowRunner", "--project=p", "--job_name=n"]
    monkeypatch.setattr(sys, "argv", [MAIN_PY] + argv)
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.WARNING)
    try:
        runpy.run_path(MAIN_PY, run_name="__main__")
        assert root.level == logging.INFO  # the launcher's console log shows the stages' progress
    finally:
        root.setLevel(saved)
    assert calls == [argv]  # outside the launcher: unchanged


def test_main_turns_boolean_parameters_into_flags(monkeypatch):
    main = _load_main()
    required = ["--catalogue=gs://my-bucket/c/*.jpg", "--model_dir=gs://my-bucket/m", "--state=gs://my-bucket/s"]
    # As the launcher passes them, nightly's parser would refuse them.
    with pytest.raises(SystemExit):
        nightly.build_parser().parse_known_args(required + ["--recalibrate=true"])
    out, location, name = main.launcher_argv(required + ["--recalibrate=true", "--break_lock=false"])
    assert out == required + ["--recalibrate"] and (location, name) == (None, None)
    args, beam_args = nightly.build_parser().parse_known_args(out)
    assert (args.recalibrate, args.break_lock, beam_args) == (True, False, [])
    out, _, _ = main.launcher_argv(required + ["--recalibrate=false", "--break_lock=True"])
    assert nightly.build_parser().parse_known_args(out)[0].break_lock is True
    assert nightly.build_parser().parse_known_args(out)[0].recalibrate is False
    with pytest.raises(ValueError, match="--recalibrate"):
        main.launcher_argv(required + ["--recalibrate=yes"])


def _launcher_argv(bucket: str, location: str) -> list[str]:
    """The flags Dataflow's Python launcher passes (parameters as --name=value, then the environment)."""
    return ["--catalogue=gs://my-bucket/catalogue/**/*.jpg", "--model_dir=gs://my-bucket/model",
            "--state=gs://my-bucket/dedup_state", "--break_lock=false", "--runner=DataflowRunner",
            "--project=fake-project", "--region=europe-west4", f"--temp_location={bucket}/tmp",
            f"--staging_location={bucket}/staging", "--job_name=siamese-dedup-nightly",
            f"--setup_file={os.path.join(ROOT, 'setup.py')}", f"--template_location={location}"]


def test_main_under_the_launcher_runs_the_stages_itself_and_writes_a_summary_job(monkeypatch, gcs_bucket, tmp_path):
    main = _load_main()
    calls = []
    manifest = {"run_date": "2026-12-03", "run_id": "r1", "generation": "2026-12-03-r1", "full": False,
                "counts": {"items": 10, "added": 2, "changed": 1, "removed": 0}, "threshold": 0.91}
    monkeypatch.setattr(nightly, "run", lambda argv=None: calls.append(argv) or manifest)
    location = tmp_path / "template_launches" / "job_object"
    location.parent.mkdir()
    assert main.main(_launcher_argv(gcs_bucket, str(location))) == manifest

    [stage_argv] = calls
    assert not any(a.startswith("--template_location") for a in stage_argv)  # the stages really run
    assert "--job_name=siamese-dedup-nightly-stage" in stage_argv  # the launch's job holds the name
    assert "--job_name=siamese-dedup-nightly" not in stage_argv and "--break_lock=false" not in stage_argv
    args, beam_args = nightly.build_parser().parse_known_args(stage_argv)
    assert (args.catalogue, args.state, args.break_lock) == ("gs://my-bucket/catalogue/**/*.jpg",
                                                               "gs://my-bucket/dedup_state", False)
    assert "--runner=DataflowRunner" in beam_args and f"--setup_file={os.path.join(ROOT, 'setup.py')}" in beam_args

    # The job the launcher creates: the summary job, under the launch's name, one worker, no package.
    job = json.loads(location.read_text())
    assert job["name"] == "siamese-dedup-nightly" and job["type"] == "JOB_TYPE_BATCH"
    [pool] = job["environment"]["workerPools"]
    assert pool["autoscalingSettings"]["maxNumWorkers"] == 1
    assert "workflow.tar.gz" not in [p["name"] for p in pool["packages"]]
    options = job["environment"]["sdkPipelineOptions"]["options"]
    assert options["project"] == "fake-project" and not options.get("setup_file")


def test_summary_job_logs_the_manifest(caplog):
    main = _load_main()
    manifest = {"run_date": "2026-12-03", "counts": {"added": 2}, "threshold": 0.91, "catalogue": "not logged"}
    caplog.set_level(logging.INFO)
    main.build_summary_pipeline(["--runner=FnApiRunner"], manifest).run().wait_until_finish()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("siamese-dedup nightly: ")]
    assert json.loads(line.partition(": ")[2]) == {"run_date": "2026-12-03", "counts": {"added": 2}, "threshold": 0.91}


def test_main_under_the_launcher_writes_no_job_when_the_run_fails(monkeypatch, tmp_path):
    main = _load_main()

    def locked(argv=None):
        raise RuntimeError("the state gs://my-bucket/dedup_state is locked by another nightly run: {...}")

    monkeypatch.setattr(nightly, "run", locked)
    location = tmp_path / "job_object"
    with pytest.raises(RuntimeError, match="locked"):
        main.main(_launcher_argv("gs://fake-bucket", str(location)))
    assert not location.exists()  # the launch fails, with the error in the launcher's log


# ---------------------------------------------------------------------------------------------- docs/nightly.md


def test_scheduler_request_body_in_the_docs_launches_the_template():
    text = open(os.path.join(ROOT, "docs", "nightly.md"), encoding="utf-8").read()
    bodies = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.S)
              if "launchParameter" in block]
    assert len(bodies) == 1
    launch = bodies[0]["launchParameter"]
    assert launch["containerSpecGcsPath"].startswith("gs://") and launch["jobName"]
    params = _params()
    given = launch["parameters"]
    assert set(given) <= set(params)
    assert {n for n, p in params.items() if not p.get("isOptional", False)} <= set(given)
    assert "break_lock" not in given  # never in a schedule
    for name, value in given.items():
        assert all(re.search(r, value) for r in params[name]["regexes"]), (name, value)
    assert '--schedule "0 2 * * *"' in text and "--time-zone" in text
    assert "flexTemplates:launch" in text and "--oauth-service-account-email" in text


# ---------------------------------------------------------------------------------------------- systemd, cron


def _unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    with open(os.path.join(SYSTEMD, name), encoding="utf-8") as f:
        unit.read_file(f)
    return unit


def _nightly_args(command: list[str]) -> argparse.Namespace:
    """The command is `.../siamese-dedup nightly FLAGS` and nightly's parser takes FLAGS, Beam flags aside."""
    assert os.path.basename(command[0]) == "siamese-dedup" and command[1] == "nightly", command
    parser = nightly.build_parser()
    args, beam_args = parser.parse_known_args(command[2:])
    assert beam_args == [], beam_args
    spelled = {opt for action in parser._actions for opt in action.option_strings}
    for word in command[2:]:  # written out in full (argparse would also take a prefix)
        assert not word.startswith("--") or word.partition("=")[0] in spelled, word
    return args


def _exec_start_words(service: configparser.ConfigParser) -> list[str]:
    """ExecStart's words as systemd passes them, with the unit's Environment defaults."""
    env = dict(token.split("=", 1) for token in shlex.split(service["Service"]["Environment"]))
    words = []
    for word in shlex.split(service["Service"]["ExecStart"]):
        braced = re.fullmatch(r"\$\{(\w+)\}", word)
        bare = re.fullmatch(r"\$(\w+)", word)
        if braced:  # ${VAR}: one argument
            words.append(env[braced.group(1)])
        elif bare:  # $VAR: split into words
            words.extend(env[bare.group(1)].split())
        else:
            words.append(word)
    return words


def test_systemd_units():
    service, timer = _unit(SERVICE), _unit("siamese-dedup-nightly.timer")
    assert service["Service"]["Type"] == "oneshot"  # active while it runs: no second run beside it
    assert service["Service"]["KillSignal"] == "SIGINT"  # stopped like Ctrl-C: the lock is released
    args = _nightly_args(_exec_start_words(service))
    assert args.catalogue == "/srv/catalogue/**/*.jpg" and args.break_lock is False and args.serve_at is None

    assert re.fullmatch(r"\*-\*-\* 02:00(:00)?( \S+)?", timer["Timer"]["OnCalendar"]), timer["Timer"]["OnCalendar"]
    assert timer["Timer"].get("Unit", SERVICE) == SERVICE and os.path.isfile(os.path.join(SYSTEMD, SERVICE))
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert "Install" not in service  # started by the timer only


def test_systemd_service_that_stays_up():
    service = _unit("siamese-dedup-nightly-serve.service")
    assert service["Service"]["Type"] == "simple"  # the process is the service
    # Stopped by a signal the command takes as Ctrl-C (beam_pipeline.cli.STOP_SIGNALS): the lock is released.
    assert signal.Signals[service["Service"]["KillSignal"]] in cli.STOP_SIGNALS
    assert service["Service"]["Restart"] == "on-failure"
    assert str(cli.EXIT_USER_ERROR) in service["Service"]["RestartPreventExitStatus"].split()
    args = _nightly_args(_exec_start_words(service))
    assert args.serve_at.strftime("%H:%M") == "02:00" and args.run_date is None and args.break_lock is False
    assert service["Install"]["WantedBy"] == "multi-user.target"


CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def _cron_field_ok(field: str, low: int, high: int) -> bool:
    for part in field.split(","):
        m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
        if not m:
            return False
        numbers = [int(n) for n in m.groups()[1:3] if n is not None]
        if any(not low <= n <= high for n in numbers) or (m.group(4) is not None and int(m.group(4)) == 0):
            return False
    return True


def test_cron_line():
    lines = [line.strip() for line in open(CRON, encoding="utf-8")]
    entries = [line for line in lines if line and not line.startswith("#")
               and not re.match(r"^[A-Z_]+=", line)]  # environment lines (SHELL=, PATH=)
    assert len(entries) == 1, entries
    fields = entries[0].split(None, 6)
    assert len(fields) == 7  # 5 time fields, the user (/etc/cron.d), the command
    assert all(_cron_field_ok(f, lo, hi) for f, (lo, hi) in zip(fields[:5], CRON_RANGES)), fields[:5]
    assert fields[:5] == ["0", "2", "*", "*", "*"]
    assert not fields[5][0].isdigit() and fields[5] != "*"  # a user name, not a sixth time field
    command = fields[6]
    assert "%" not in command  # cron would turn it into a newline
    words = shlex.split(command)
    while len(words) > 2 and (words[-1].startswith(("2>", ">")) or words[-2] in (">", ">>")):
        words = words[:-2] if words[-2] in (">", ">>") else words[:-1]
    args = _nightly_args(words)
    assert args.catalogue == "/srv/catalogue/**/*.jpg"  # quoted: the shell leaves the glob to nightly
