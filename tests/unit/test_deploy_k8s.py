"""deploy/k8s: every built-in resource validated against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors), the ServiceMonitor CRD checked by
structure, and the manifests checked against each other and against the daemon: probes on the
right paths and port, a grace period longer than preStop plus drain, selectors that match, secrets
that exist, and a ConfigMap that loads with exactly the environment a pod gets."""

from __future__ import annotations

import tempfile
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conflux.config import load_config
from conflux.errors import ConfigError
from tests.support import REPO
from tests.unit.test_deploy_containers import dockerfile_stages, env_of, first, image_env

K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes these manifests promise to work on, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def manifests() -> dict[str, dict]:
    """kind -> the one resource of that kind (each file holds one)."""
    resources = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in resources, f"two {doc['kind']} resources"
            resources[doc["kind"]] = doc
    return resources


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return manifests()


@pytest.fixture(scope="module")
def container(k8s) -> dict:
    containers = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.fixture(scope="module")
def final_stage() -> list:
    return dockerfile_stages((REPO / "deploy" / "Dockerfile").read_text())[-1]


def pod_env(container: dict, secret: dict) -> dict[str, str]:
    """The container's environment with each secretKeyRef resolved from the Secret manifest."""
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], item
            env[item["name"]] = secret["stringData"][ref["key"]]
    return env


def pod_config(k8s: dict, container: dict, final_stage: list):
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/conflux" and mount.get("readOnly")
    text = k8s["ConfigMap"]["data"]["conflux.toml"]
    path = Path(mount["mountPath"]) / "conflux.toml"
    assert ["conflux", "run", "-c", str(path)] == container["args"]
    environ = {**image_env(final_stage), **pod_env(container, k8s["Secret"])}
    # load_config reads a file; the ConfigMap's text is what the pod finds at `path`.
    return load_config_text(text, environ)


def load_config_text(text: str, environ: dict[str, str]):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "conflux.toml"
        path.write_text(text)
        return load_config(path, environ=environ)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_resources_match_the_kubernetes_schemas(k8s, version):
    for kind, resource in k8s.items():
        if (resource["apiVersion"], kind) in CRDS:
            continue
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_service_monitor_has_the_fields_the_crd_requires(k8s):
    monitor = k8s["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}


def test_selectors_match_the_pods(k8s):
    deployment = k8s["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert k8s["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    # The ServiceMonitor finds the Service by its labels, then scrapes its named port.
    monitored = k8s["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert monitored.items() <= k8s["Service"]["metadata"]["labels"].items()
    service_ports = {port["name"] for port in k8s["Service"]["spec"]["ports"]}
    assert {endpoint["port"] for endpoint in k8s["ServiceMonitor"]["spec"]["endpoints"]} <= service_ports
    assert [endpoint["path"] for endpoint in k8s["ServiceMonitor"]["spec"]["endpoints"]] == ["/metrics"]


def test_probes_ask_ready_and_health_on_the_port_the_daemon_listens_on(k8s, container, final_stage):
    config = pod_config(k8s, container, final_stage)
    port = int(config.control.listen.rpartition(":")[2])
    assert config.control.listen.startswith("0.0.0.0:")
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"control": port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "control"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "control"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert {p["targetPort"] for p in k8s["Service"]["spec"]["ports"]} == {"control"}


def test_the_grace_period_outlasts_the_pre_stop_hook_and_the_drain(k8s, container, final_stage):
    config = pod_config(k8s, container, final_stage)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    grace_s = k8s["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s >= int(command[1]) + config.daemon.shutdown_timeout_s + 10


def test_the_pod_runs_as_the_images_non_root_user_on_a_read_only_root(k8s, container, final_stage):
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    uid, _, gid = first(final_stage, "USER").args.partition(":")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (int(uid), int(gid))
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["readOnlyRootFilesystem"] is True
    # So everything the daemon writes must be a mounted volume: its state dir, /dev/shm rings, /tmp.
    config = pod_config(k8s, container, final_stage)
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert {config.daemon.state_dir, str(Path(config.log.path).parent), "/dev/shm", "/tmp"} <= writable
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert env_of(final_stage)["CONFLUX_DAEMON_STATE_DIR"] == config.daemon.state_dir


def test_resources_replicas_and_disruption_budget_leave_the_group_serving(k8s, container, final_stage):
    assert set(container["resources"]) == {"requests", "limits"}
    replicas = k8s["Deployment"]["spec"]["replicas"]
    assert replicas >= 2 and k8s["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert k8s["PodDisruptionBudget"]["spec"]["maxUnavailable"] < replicas
    config = pod_config(k8s, container, final_stage)
    assert config.log.backend == "kafka", "replicas share work through Kafka; the embedded log is one host's"
    assert config.log.partitions >= replicas * config.workers.consumers


def test_every_secret_the_config_names_comes_from_the_secret(k8s, container):
    raw = tomllib.loads(k8s["ConfigMap"]["data"]["conflux.toml"])
    named = {raw["control"]["token_env"], raw["sink"]["token_env"],
             *(source["webhook_secret_env"] for source in raw["sources"])}
    from_secret = {item["name"] for item in container["env"] if "valueFrom" in item}
    assert named == from_secret
    assert not [name for name in named if name.startswith("CONFLUX_")], "CONFLUX_* names are config overrides"
    # For the same reason Kubernetes must not add its CONFLUX_SERVICE_HOST-style variables.
    assert k8s["Deployment"]["spec"]["template"]["spec"]["enableServiceLinks"] is False
    used_keys = {item["valueFrom"]["secretKeyRef"]["key"] for item in container["env"] if "valueFrom" in item}
    assert used_keys == set(k8s["Secret"]["stringData"])


def test_pods_listen_on_all_interfaces_only_with_the_token_from_the_secret(k8s, container, final_stage):
    config = pod_config(k8s, container, final_stage)
    assert config.control.listen.startswith("0.0.0.0:") and not config.control.allow_unauthenticated
    token_ref = next(item for item in container["env"] if item["name"] == config.control.token_env)
    assert token_ref["valueFrom"]["secretKeyRef"]["name"] == k8s["Secret"]["metadata"]["name"]
    # Without the token the pod would not start: the daemon refuses a reachable listen.
    text = k8s["ConfigMap"]["data"]["conflux.toml"]
    environ = {**image_env(final_stage), **pod_env(container, k8s["Secret"])}
    with pytest.raises(ConfigError, match=r"^control: listen '0\.0\.0\.0:\d+' is reachable"):
        load_config_text(text.replace(f'token_env = "{config.control.token_env}"', ""), environ)
    del environ[config.control.token_env]
    with pytest.raises(ConfigError, match=r"^control\.token_env: environment variable \w+ is not set"):
        load_config_text(text, environ)
    # The ServiceMonitor scrapes without a token: /metrics must stay open, or carry the token.
    endpoints = k8s["ServiceMonitor"]["spec"]["endpoints"]
    assert not config.control.metrics_require_token or all("bearerTokenSecret" in e for e in endpoints)
