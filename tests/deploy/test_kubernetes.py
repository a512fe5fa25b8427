"""deploy/kubernetes and deploy/Dockerfile: schema-valid manifests that agree with each other and with the CLI.

Built-in kinds are validated with kubernetes-validate, which bundles the Kubernetes JSON schemas of every
release (strict variants: unknown fields are errors), so the check runs offline.

The PodMonitor is a prometheus-operator CRD that no Kubernetes schema covers. Rather than vendoring the
operator's ~45 kB generated CRD schema (a copy of third-party text that goes stale with every operator
release), it is checked against the subset of the monitoring.coreos.com/v1 PodMonitor API that we use,
written below with ``additionalProperties: false`` so that a misspelt field fails; its metadata and label
selector are checked against the real Kubernetes definitions from kubernetes-validate's bundle.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version, schema_contents
from referencing import Registry, Resource

from tests.deploy.helpers import DEPLOY, load_yaml_documents
from vllm_layered.cli import build_parser
from vllm_layered.serving.tenants import TenantRegistry

MANIFESTS = DEPLOY / "kubernetes"
# An older release still common on GPU clusters, and the newest one kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", latest_version())
PLACEHOLDER_KEYS = {"acme": "change-me-acme", "globex": "change-me-globex"}  # documented in secret.yaml

_K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
POD_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"$ref": f"{_K8S_DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"$ref": f"{_K8S_DEFINITIONS}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def _resources() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, resource)
        for path in sorted(MANIFESTS.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for resource in load_yaml_documents(path)
    ]


def _only(kind: str, component: str = "server") -> dict[str, Any]:
    """The one resource of ``kind`` of the server (or of the Redis tenant store: component "tenant-store")."""
    found = [resource for _, resource in _resources()
             if resource["kind"] == kind and resource["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(found) == 1, f"expected one {kind} of the {component}, found {len(found)}"
    return found[0]


def _container(component: str = "server") -> dict[str, Any]:
    (container,) = _only("Deployment", component)["spec"]["template"]["spec"]["containers"]
    return container


def _server_args() -> argparse.Namespace:
    return build_parser().parse_args(json.loads(_dockerfile_instruction("ENTRYPOINT"))[1:] + _container()["args"])


def _dockerfile_instruction(name: str) -> str:
    """The argument of the last Dockerfile instruction ``name`` (continuation lines joined)."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(.+)$", text, flags=re.MULTILINE)
    assert found, f"deploy/Dockerfile has no {name}"
    return found[-1].strip()


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("resource", [
    pytest.param(resource, id=f"{name}:{resource['kind']}") for name, resource in _resources()
    if resource["kind"] != "PodMonitor"
])
def test_manifest_matches_the_kubernetes_schema(resource: dict[str, Any], version: str):
    assert kubernetes_validate.validate(resource, version, strict=True)


def test_pod_monitor_matches_the_prometheus_operator_api():
    definitions = schema_contents(f"kubernetes-json-schema/v{latest_version()}-local-strict/_definitions.json",
                                  latest_version())
    registry = Registry().with_resource(_K8S_DEFINITIONS, Resource.from_contents(definitions))
    jsonschema.Draft202012Validator(POD_MONITOR_SCHEMA, registry=registry).validate(_only("PodMonitor"))


def test_kustomization_lists_every_manifest():
    (kustomization,) = load_yaml_documents(MANIFESTS / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    manifests = {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    assert [image["name"] for image in kustomization["images"]] == [_container()["image"].split(":")[0]]


def test_the_container_runs_a_valid_serve_command_line():
    """Dockerfile ENTRYPOINT + the Deployment's args (and + CMD) are accepted by the real CLI parser."""
    entrypoint, cmd = json.loads(_dockerfile_instruction("ENTRYPOINT")), json.loads(_dockerfile_instruction("CMD"))
    container = _container()
    assert "command" not in container, "the Deployment must keep the image's entrypoint"
    assert entrypoint[0] == "vllm-layered"
    assert build_parser().parse_args(entrypoint[1:] + cmd).command == "serve"
    args = build_parser().parse_args(entrypoint[1:] + container["args"])
    assert args.command == "serve" and args.host == "0.0.0.0"

    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": args.port}
    assert _dockerfile_instruction("EXPOSE") == str(args.port)
    healthcheck = _dockerfile_instruction("HEALTHCHECK")
    assert f"127.0.0.1:{args.port}/health" in healthcheck and "--start-period=" in healthcheck

    # --api-keys names the keys file of the mounted Secret
    pod = _only("Deployment")["spec"]["template"]["spec"]
    (mount,) = [m for m in container["volumeMounts"] if Path(args.api_keys).parent == Path(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (item,) = [i for i in volume["secret"]["items"] if i["path"] == args.api_keys.name]
    secret = _only("Secret")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert item["key"] in secret["stringData"]


def test_the_secret_holds_a_keys_file_the_server_accepts(tmp_path):
    secret = _only("Secret")
    path = tmp_path / "keys.json"
    path.write_text(secret["stringData"]["keys.json"])
    tenants = TenantRegistry.from_file(path)
    assert set(tenants.tenants) == set(PLACEHOLDER_KEYS)
    for tenant, key in PLACEHOLDER_KEYS.items():  # the digests are `vllm-layered hash-key` of these keys
        assert tenants.authenticate(f"Bearer {key}").name == tenant


def test_the_pod_is_a_non_root_gpu_pod_with_health_probes():
    deployment = _only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    user = _dockerfile_instruction("USER").split(":")[0]
    assert str(pod["securityContext"]["runAsUser"]) == user and user != "0"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60, "loading ~54 GB takes minutes"

    args = _server_args()
    pre_stop = shlex.join(container["lifecycle"]["preStop"]["exec"]["command"])
    pre_stop_s = int(re.fullmatch(r"sleep (\d+)", pre_stop)[1])
    assert pod["terminationGracePeriodSeconds"] > args.shutdown_grace + pre_stop_s

    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/models", "/tmp"} <= mounts, "a read-only root needs the model cache and /tmp writable"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_HOME"].startswith("/models/")


def test_service_scrape_config_and_autoscaler_point_at_the_pods():
    deployment = _only("Deployment")
    template = deployment["spec"]["template"]
    pod_labels = template["metadata"]["labels"]
    port_names = {port["name"]: port["containerPort"] for port in _container()["ports"]}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = _only("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(port_names)

    monitor = _only("PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    for endpoint in monitor["podMetricsEndpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(port_names["http"])

    hpa = _only("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    for metric in hpa["metrics"]:
        assert metric["type"] in ("Pods", "External")
        assert metric[metric["type"].lower()]["target"]["type"] == "AverageValue"

    claims = {v["persistentVolumeClaim"]["claimName"] for v in template["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {_only("PersistentVolumeClaim")["metadata"]["name"]}


def test_the_replicas_share_the_tenant_store_of_the_manifests():
    """--tenant-store names the Redis Service; the Service and the NetworkPolicy reach the Redis pod, and only
    the server pods may talk to it; neither the server's Service nor its PodMonitor selects the Redis pod."""
    url = urlsplit(_server_args().tenant_store)
    service, store = _only("Service", "tenant-store"), _only("Deployment", "tenant-store")
    (port,) = service["spec"]["ports"]
    assert url.scheme == "redis" and (url.hostname, url.port) == (service["metadata"]["name"], port["port"])
    assert store["spec"]["replicas"] == 1, "one store: two would each hold half of the leases"
    store_labels = store["spec"]["template"]["metadata"]["labels"]
    server_labels = _only("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= store_labels.items()
    assert not service["spec"]["selector"].items() <= server_labels.items()
    for selector in (_only("Service")["spec"]["selector"], _only("PodMonitor")["spec"]["selector"]["matchLabels"]):
        assert not selector.items() <= store_labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in _container("tenant-store")["ports"]}
    assert container_ports == {port["targetPort"]: 6379}

    policy = _only("NetworkPolicy", "tenant-store")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= store_labels.items()
    (rule,) = policy["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"].items() <= server_labels.items()
    assert [p["port"] for p in rule["ports"]] == [port["targetPort"]]

    container = _container("tenant-store")
    assert store["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
