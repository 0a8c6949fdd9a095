"""``deploy/rayservice.yaml``: valid YAML, the RayService's fields named as KubeRay's CRD
names them, a Serve config Ray Serve's own schema accepts, whose application builds, and
an export Job whose command the CLI parses."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "rayservice.yaml"

# The RayService fields this manifest may use, as KubeRay's CRD (ray.io/v1,
# config/crd/bases/ray.io_rayservices.yaml, KubeRay 1.x) names them; "template" is a
# Kubernetes PodTemplateSpec, checked with POD below.
RAYSERVICE = {
    "apiVersion": None,
    "kind": None,
    "metadata": {"name": None, "namespace": None, "labels": None, "annotations": None},
    "spec": {
        "serveConfigV2": None,
        "serviceUnhealthySecondThreshold": None,
        "deploymentUnhealthySecondThreshold": None,
        "excludeHeadPodFromServeSvc": None,
        "serveService": None,
        "upgradeStrategy": None,
        "rayClusterConfig": {
            "rayVersion": None,
            "enableInTreeAutoscaling": None,
            "autoscalerOptions": None,
            "headGroupSpec": {"rayStartParams": None, "serviceType": None, "template": "POD"},
            "workerGroupSpecs": [
                {
                    "groupName": None,
                    "replicas": None,
                    "minReplicas": None,
                    "maxReplicas": None,
                    "rayStartParams": None,
                    "idleTimeoutSeconds": None,
                    "template": "POD",
                }
            ],
        },
    },
}
CONTAINER = {
    "name": None,
    "image": None,
    "command": None,
    "args": None,
    "env": [{"name": None, "value": None}],
    "ports": [{"containerPort": None, "name": None, "protocol": None}],
    "resources": {"limits": None, "requests": None},
    "volumeMounts": [{"name": None, "mountPath": None, "readOnly": None}],
}
POD = {
    "metadata": {"labels": None, "annotations": None},
    "spec": {
        "containers": [CONTAINER],
        "volumes": [{"name": None, "persistentVolumeClaim": {"claimName": None, "readOnly": None}}],
        "restartPolicy": None,
        "tolerations": None,
        "nodeSelector": None,
    },
}


def check_fields(value: Any, allowed: Any, path: str) -> None:
    """Every key of ``value`` is a field ``allowed`` names (None: any content below)."""
    if allowed is None:
        return
    if allowed == "POD":
        allowed = POD
    if isinstance(allowed, list):
        assert isinstance(value, list), f"{path} is a list"
        for i, item in enumerate(value):
            check_fields(item, allowed[0], f"{path}[{i}]")
        return
    assert isinstance(value, dict), f"{path} is an object"
    for key, item in value.items():
        assert key in allowed, f"{path}.{key} is not a field of the CRD here"
        check_fields(item, allowed[key], f"{path}.{key}")


def documents() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    return {d["kind"]: d for d in docs}


def test_the_manifest_is_a_volume_an_export_job_and_a_rayservice():
    docs = documents()
    assert set(docs) == {"PersistentVolumeClaim", "Job", "RayService"}
    service = docs["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    check_fields(service, RAYSERVICE, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    mounted = {v["persistentVolumeClaim"]["claimName"] for v in workers["template"]["spec"]["volumes"]}
    assert mounted == {claim}
    for container in (worker, *cluster["headGroupSpec"]["template"]["spec"]["containers"]):
        assert {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"} in container["env"]
    job = docs["Job"]["spec"]["template"]
    check_fields(job, POD, "Job.template")


def test_the_serve_config_is_valid_and_its_application_builds():
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema
    from riffusion_engine.engine.serve.cluster import app_builder

    config = yaml.safe_load(documents()["RayService"]["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "riffusion_engine.engine.serve.cluster:app_builder"
    app = app_builder(application.args)
    from ray.serve import Application

    assert isinstance(app, Application)
    # What the export Job writes is what the replicas load.
    job = documents()["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert application.args["artifacts"] == job["command"][job["command"].index("-o") + 1]


def test_the_export_job_runs_a_valid_export_command():
    from riffusion_engine.engine.cli import build_parser

    job = documents()["Job"]["spec"]["template"]["spec"]["containers"][0]
    command = job["command"]
    assert command[0] == "riffusion-engine"
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.target, args.device) == ("export", "tensorrt", "cuda"), shlex.join(command)


def test_the_app_builder_types_string_arguments_and_refuses_unknown_ones():
    """``serve run ...:app_builder key=value`` passes strings: they become the fields' types."""
    pytest.importorskip("ray.serve")
    import typing

    from riffusion_engine import RiffusionError
    from riffusion_engine.engine.serve.cluster import app_builder
    from riffusion_engine.engine.serve.cluster.deploy import _typed
    from riffusion_engine.engine.serve.config import ServerConfig

    hints = typing.get_type_hints(ServerConfig)
    assert _typed(hints["max_batch"], "2", "max_batch") == 2
    assert _typed(hints["degrade_steps"], "none", "degrade_steps") is None
    assert _typed(hints["cors_origins"], "http://a,http://b", "cors_origins") == ("http://a", "http://b")
    assert app_builder({"artifacts": "/x", "replicas": "2", "timeout_s": "50"}) is not None
    with pytest.raises(RiffusionError, match="unknown argument 'replica'"):
        app_builder({"artifacts": "/x", "replica": "2"})
    with pytest.raises(RiffusionError, match="max_batch must be"):
        app_builder({"artifacts": "/x", "max_batch": "four"})
    with pytest.raises(RiffusionError, match=r"needs args\.artifacts"):
        app_builder({})


def image_recipe() -> list[str]:
    """The image's RUN commands from the manifest's header (``#   RUN ...`` and its ``#    &&``
    continuations), as one shell line split on ``&&``."""
    lines, running = [], False
    for line in MANIFEST.read_text().splitlines():
        text = line.lstrip("#").strip()
        if text.startswith("RUN "):
            running = True
            text = text[4:]
        elif not (running and text.startswith("&&")):
            running = False
            continue
        lines.append(text.rstrip("\\").strip())
    return [part.strip() for part in " ".join(lines).split("&&") if part.strip()]


def extra_requirements(extras: list[str]) -> set[str]:
    """The distributions the package's extras install, the package's own extras followed."""
    import re

    import tomllib

    project = tomllib.loads((MANIFEST.parents[1] / "pyproject.toml").read_text())["project"]
    names, todo, seen = set(), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in project["optional-dependencies"][extra]:
            name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
            inner = re.match(r"riffusion-engine\[([^\]]+)\]", requirement)
            if inner:
                todo += inner.group(1).split(",")
            else:
                names.add(name)
    return names


def test_the_image_recipe_installs_what_replicas_and_the_export_job_import():
    """A replica imports torch (the device check) and transformers (the export's tokenizer),
    the Job exports with diffusers; the GPU extras' onnxruntime-gpu must replace the CPU
    onnxruntime that `models` brings (both install the module onnxruntime)."""
    install, *rest = image_recipe()
    words = shlex.split(install)
    (package,) = [w for w in words if w.startswith("riffusion-engine[")]
    extras = package[len("riffusion-engine[") : -1].split(",")
    installed = extra_requirements(extras)
    needed = {
        "torch",
        "transformers",
        "diffusers",
        "onnx",
        "ray",
        "cupy-cuda13x",
        "tensorrt-cu13",
        "polygraphy",
    }
    assert needed <= installed, needed - installed
    assert any(w.startswith("torch>=2.11") for w in words)  # CUDA 13's torch, as the gpu extra's CUDA
    assert "onnxruntime" in installed and "onnxruntime-gpu" in installed
    assert rest == [
        "pip uninstall -y onnxruntime",
        "pip install --force-reinstall --no-deps 'onnxruntime-gpu>=1.28,<2'",
    ]
