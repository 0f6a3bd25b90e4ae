"""The `gpu` extra resolves, from the package registry, to the stack docker/Dockerfile's CUDA image can run: the
pinned vLLM and torch, a torch built for the image's CUDA major version, and no straggler the Makefile leaves
behind (docs/design.md, "The GPU stack"). Resolution only (`pip install --dry-run`): nothing is installed, no GPU is
needed; it needs the registry (skipped when it is unreachable) and a minute or two, hence `long`."""

from __future__ import annotations

import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
STRAGGLERS = ("torchaudio", "torchcodec")  # PyPI builds vLLM drags in (docs/design.md, "The 2-core CPU machines")
PYPI = "https://pypi.org/simple/"
# Network errors as pip words them: the registry, not the pins, is at fault.
NETWORK = re.compile(r"NewConnectionError|ConnectTimeout|ReadTimeout|Temporary failure in name resolution|"
                     r"Max retries exceeded|Network is unreachable|Connection refused|ProxyError")

pytestmark = pytest.mark.long


def gpu_pins() -> dict[str, str]:
    """name -> version of the `gpu` extra's exact (==) pins."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    pins = {}
    for line in extra:
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def image_cuda() -> Version:
    """The CUDA version of docker/Dockerfile's base image (nvidia/cuda:X.Y.Z-...)."""
    match = re.search(r"^FROM\s+(?:\S+/)?nvidia/cuda:(\d+\.\d+(?:\.\d+)?)-", (ROOT / "docker/Dockerfile").read_text(),
                      re.M)
    assert match, "docker/Dockerfile's base is not an nvidia/cuda:X.Y.Z-... image"
    return Version(match.group(1))


def gpu_uninstalls(tmp_path: Path) -> set[str]:
    """The packages `make venv EXTRA=gpu` uninstalls after the install (its `pip uninstall` lines)."""
    venv = tmp_path / "venv"  # missing: make -n then lists the whole install
    out = subprocess.run(["make", "-n", "venv", "EXTRA=gpu", f"VENV={venv}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    removed = set()
    for line in out.splitlines():
        tokens = shlex.split(line) if line.strip() and not line.lstrip().startswith("#") else []
        if len(tokens) > 2 and tokens[0].endswith("pip") and tokens[1] == "uninstall":
            removed |= {canonicalize_name(t) for t in tokens[2:] if not t.startswith("-")}
    return removed


def registry_env() -> dict[str, str]:
    """The environment for pip: the registry as the image sees it. This machine's pip configuration goes (its
    find-links wheels, e.g. a `+cpu` torch that would satisfy `torch==X`, and its constraint caps); an index given
    through PIP_INDEX_URL (a mirror) and the certificate settings stay."""
    keep = {"PIP_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT", "PIP_PROXY"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in keep}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def skip_unless_registry(env: dict[str, str]) -> None:
    index = env.get("PIP_INDEX_URL", PYPI).rstrip("/") + "/"
    context = ssl.create_default_context(cafile=env.get("PIP_CERT") or None)
    try:
        urllib.request.urlopen(index + "vllm/", timeout=30, context=context).close()
    except (urllib.error.URLError, OSError) as exc:
        pytest.skip(f"package registry unreachable ({index}vllm/: {exc}); the GPU stack cannot be resolved")


def resolve_gpu_extra() -> dict:
    """`pip install --dry-run --report - --ignore-installed ".[gpu]"` under docker/constraints.txt, as the image's
    `make venv EXTRA=gpu` resolves it (PIP_CONSTRAINT there)."""
    env = registry_env()
    skip_unless_registry(env)
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
               "--constraint", "docker/constraints.txt", ".[gpu]"]
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail("resolving .[gpu] took over 15 minutes")
    if result.returncode != 0 and NETWORK.search(result.stderr):
        pytest.skip(f"package registry unreachable while resolving: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, f"{shlex.join(command)} failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def report() -> dict:
    return resolve_gpu_extra()


def resolved(report: dict) -> dict[str, dict]:
    """canonical name -> the resolved distribution's core metadata."""
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"] for item in report["install"]}


def cuda_majors(metadata: dict, environment: dict[str, str]) -> set[int]:
    """The CUDA major versions a distribution's Linux requirements name: nvidia-*-cuNN wheels (CUDA 12 torch) or
    the cuda-toolkit==N.x meta-package (CUDA 13 torch)."""
    majors = set()
    for line in metadata.get("requires_dist") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({**environment, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if suffix := re.fullmatch(r"nvidia-.+-cu(\d+)", name):
            majors.add(int(suffix.group(1)))
        elif name == "cuda-toolkit":
            majors |= {Version(spec.version).major for spec in req.specifier if spec.operator in ("==", "~=")}
    return majors


def test_gpu_extra_pins_vllm_and_torch(report):
    pins = gpu_pins()
    assert {"vllm", "torch"} <= pins.keys(), f"the gpu extra must pin vllm==X and torch==Y, it pins {pins}"
    found = resolved(report)
    for name in ("vllm", "torch"):
        version = Version(found[name]["version"])
        # A local label (2.10.0+cpu) would be another build of the same number: the CPU wheel, or another CUDA's.
        assert version.local is None and str(version) == pins[name], \
            f"{name} resolved to {version}, pinned {pins[name]}"
    vllm_torch = [Requirement(r) for r in found["vllm"].get("requires_dist") or [] if Requirement(r).name == "torch"]
    assert all(req.specifier.contains(pins["torch"]) for req in vllm_torch), f"vllm wants {vllm_torch}"


def test_torch_is_built_for_the_image_cuda(report):
    image = image_cuda()
    found = resolved(report)
    environment = {**default_environment(), **report["environment"]}
    majors = cuda_majors(found["torch"], environment)
    assert majors, f"torch {found['torch']['version']} requires no CUDA libraries: a CPU build"
    assert majors == {image.major}, f"torch is built for CUDA {sorted(majors)}, the image is CUDA {image}"
    runtime = found.get(f"nvidia-cuda-runtime-cu{image.major}") or found.get("nvidia-cuda-runtime")
    assert runtime and Version(runtime["version"]).major == image.major, \
        f"CUDA runtime {runtime and runtime['version']}"
    # vLLM's kernel packages come in per-CUDA flavours too (nvidia-cutlass-dsl-libs-cu13, ...): none of another major.
    foreign = sorted(name for name in found
                     if (m := re.fullmatch(r".+-cu(\d+)", name)) and int(m.group(1)) != image.major)
    assert not foreign, f"packages built for another CUDA than the image's {image}: {foreign}"


def test_no_straggler_survives_the_install(report, tmp_path):
    found = resolved(report)
    removed = gpu_uninstalls(tmp_path)
    left = [name for name in STRAGGLERS if name in found and name not in removed]
    assert not left, f"resolved and not removed by the Makefile's GPU uninstall ({sorted(removed)}): {left}"
    # What the install keeps of torch's companions must be the build for the pinned torch, not another torch's.
    torch = found["torch"]["version"]
    for name in ("torchvision", *STRAGGLERS):
        if name in found and name not in removed:
            wants = [Requirement(r) for r in found[name].get("requires_dist") or [] if Requirement(r).name == "torch"]
            assert wants and all(str(req.specifier) == f"=={torch}" for req in wants), \
                f"{name} {found[name]['version']} is kept but built for torch {wants}, not {torch}"
