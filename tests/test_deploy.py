"""Deployment files: every manifest parses, names the image the Dockerfile builds and entry points that exist."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from tdastore.cli import make_parser

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"


def image_tag() -> str:
    text = (DEPLOY / "Dockerfile").read_text()
    return re.search(r"-t (\S+) \.", text).group(1)


def manifests():
    for path in sorted((DEPLOY / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            yield path.name, doc


def images(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image":
                yield value
            else:
                yield from images(value)
    elif isinstance(node, list):
        for item in node:
            yield from images(item)


def test_dockerfile_copies_what_the_jobs_need():
    text = (DEPLOY / "Dockerfile").read_text()
    for part in ("COPY tdastore", "COPY jobs", "COPY configs", "COPY pyproject.toml"):
        assert part in text
    assert "torch==2.13.0" in text and "rayproject/ray:2.60.0" in text


def test_kuberay_manifests():
    kinds, policies = {}, []
    for name, doc in manifests():
        kinds.setdefault(doc["kind"], []).append(name)
        if doc["kind"] == "NetworkPolicy":
            policies.append(doc)
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert doc["apiVersion"] == "ray.io/v1"
            found = set(images(doc))
            assert found == {image_tag()}, (name, found)
            spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
            gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert gpu["nvidia.com/gpu"] == 1 and groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
        if doc["kind"] == "RayJob":
            for part in doc["spec"]["entrypoint"].split("&&"):  # the documented route: tdastore <command>
                words = shlex.split(part)
                assert words[0] == "tdastore", words
                args = make_parser().parse_args(words[1:])  # a real command with real flags
                config = ROOT / args.config
                import tdastore

                loaded = tdastore.load_config(config)
                assert loaded.store.path.startswith("/mnt/shared/")  # every node sees the shared volume
            assert yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"]
        if doc["kind"] == "Kustomization":  # the image as a parameter
            assert all((DEPLOY / "kuberay" / r).is_file() for r in doc["resources"])
            (image,) = doc["images"]
            assert f"{image['newName']}:{image['newTag']}" == image_tag()
        if doc["kind"] == "RayService":
            check_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    assert set(kinds) >= {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim", "Kustomization"}
    (policy,) = policies  # who may reach the Ray pods: the service port only from named clients
    admitted = {p["port"]: rule["from"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert admitted[8000] == [{"podSelector": {"matchLabels": {"tdastore-client": "true"}}}]
    assert len(kinds["RayJob"]) == 2


def check_serve_config(config: dict) -> None:
    """Ray Serve's own schema accepts it; the application's builder exists and accepts its args; the store is
    the one the cluster config builds, on the shared volume."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    import tdastore
    from tdastore.serve import ServiceArgs

    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    args = ServiceArgs.model_validate(app["args"])
    assert args.read_only and args.token_file  # the served store is never written; callers need the token
    cluster = tdastore.load_config(ROOT / "configs" / "cluster_diabetes.yaml")
    assert args.store == cluster.store.path
    assert set(args.methods) <= set(cluster.attribution.methods)


def test_cluster_launcher_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "cluster-aws.yaml").read_text())
    validate_config(prepare_config(config))
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])  # reached by `ray dashboard`
    assert config["docker"]["image"] == image_tag()
    assert config["available_node_types"]["ray.worker.gpu"]["resources"] == {"GPU": 1}
    broken = {**config, "head_node_type": "ray.head.missing"}
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("job", ["build_index", "index", "query", "ground_truth", "evaluate"])
def test_every_job_has_help(job):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--config" in result.stdout
