"""deploy/Dockerfile and deploy/docker-compose.yml, checked without a Docker engine: hadolint-style
rules on the Dockerfile, and the compose file parsed, interpolated the way Compose does, and its
Conflux config loaded with exactly the environment a replica would see."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from conflux.config import ControlConfig, DaemonConfig, load_config
from conflux.errors import ConfigError
from tests.support import REPO

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
CONTROL_PORT = int(ControlConfig().listen.rpartition(":")[2])
BROKERS = ("kafka-1", "kafka-2", "kafka-3")
INITS = ("tini", "dumb-init")


# -- Dockerfile ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    name: str
    args: str


def dockerfile_stages(text: str) -> list[list[Instruction]]:
    """Instructions per build stage (a global ARG before the first FROM is its own 'stage')."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                            if not line.lstrip().startswith("#")))
    stages: list[list[Instruction]] = [[]]
    for line in joined.splitlines():
        if not line.strip():
            continue
        name, _, args = line.strip().partition(" ")
        if name.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(name.upper(), args.strip()))
    return stages


def global_args(stages: list[list[Instruction]]) -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in stages[0] if i.name == "ARG" and "=" in i.args)


def exec_form(instruction: Instruction) -> list[str]:
    """CMD/ENTRYPOINT must be JSON arrays: a shell form would put sh between tini and the daemon."""
    args = instruction.args
    if instruction.name == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4:]
    value = json.loads(args)
    assert isinstance(value, list), f"{instruction.name} is not in exec form: {instruction.args}"
    return value


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.name == "ENV":
            for token in shlex.split(instruction.args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def first(stage: list[Instruction], name: str) -> Instruction:
    found = [i for i in stage if i.name == name]
    assert found, f"the final stage has no {name}"
    return found[-1]


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return dockerfile_stages(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(stages) -> list[Instruction]:
    return stages[-1]


def image_env(final_stage: list[Instruction]) -> dict[str, str]:
    env = env_of(final_stage)
    env["PATH"] = env["PATH"].replace("$PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


def test_every_base_image_is_pinned_to_a_tag_other_than_latest(stages):
    args = global_args(stages)
    stage_names = {stage[0].args.split()[-1] for stage in stages[1:] if " AS " in stage[0].args.upper()}
    for stage in stages[1:]:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage[0].args.split()[0])
        if image in stage_names:
            continue  # built on an earlier stage
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"unpinned base image {image}"


def test_the_image_runs_as_a_numeric_non_root_user(final):
    user = first(final, "USER").args
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: Kubernetes' runAsNonRoot needs a numeric non-root uid"


def test_an_init_process_is_pid_1_and_forwards_term_to_the_supervisor_alone(final):
    entrypoint = exec_form(first(final, "ENTRYPOINT"))
    assert Path(entrypoint[0]).name in INITS, entrypoint
    # tini -g / dumb-init's default group mode would TERM every worker at once and skip the drain.
    assert "-g" not in entrypoint and (Path(entrypoint[0]).name != "dumb-init" or "--single-child" in entrypoint)
    installs = " ".join(i.args for i in final if i.name == "RUN")
    assert re.search(rf"apt-get install\b[^&]*\b{Path(entrypoint[0]).name}\b", installs)
    assert exec_form(first(final, "CMD")) == ["conflux", "run", "-c", "/etc/conflux/conflux.toml"]
    assert first(final, "STOPSIGNAL").args == "SIGTERM"


def test_the_healthcheck_asks_health_on_the_control_port(final):
    healthcheck = first(final, "HEALTHCHECK")
    command = " ".join(exec_form(healthcheck))
    assert "/health" in command and "CONFLUX_CONTROL_LISTEN" in command
    assert re.search(r"--timeout=\d+s", healthcheck.args) and re.search(r"--interval=\d+s", healthcheck.args)


def test_the_container_listens_on_all_interfaces_only_through_its_environment_and_only_with_a_token(final):
    assert ControlConfig().listen.startswith("127.0.0.1:"), "the daemon's own default must stay loopback"
    env = image_env(final)
    assert env["CONFLUX_CONTROL_LISTEN"] == f"0.0.0.0:{CONTROL_PORT}"
    assert str(CONTROL_PORT) in first(final, "EXPOSE").args.split()
    assert not any(name.startswith("CONFLUX_CONTROL_TOKEN") or name == "CONFLUX_CONTROL_ALLOW_UNAUTHENTICATED"
                   for name in env), "the image must not bring its own token or waive it"
    with pytest.raises(ConfigError, match=r"^control: listen '0\.0\.0\.0:\d+' is reachable from other hosts"):
        load_config(None, environ=env)  # the image alone: `conflux run` exits 3 rather than serve everyone
    config = load_config(None, environ={**env, "CONFLUX_CONTROL_TOKEN": "t0k"})  # as the run example passes it
    assert config.control.listen == f"0.0.0.0:{CONTROL_PORT}"
    assert "CONFLUX_CONTROL_TOKEN" in DOCKERFILE.read_text()  # and the example says so
    assert Path(config.log.path).parent == Path(config.daemon.state_dir) == Path(first(final, "WORKDIR").args)
    assert json.loads(first(final, "VOLUME").args) == [config.daemon.state_dir]


def test_installs_leave_no_caches_and_no_remote_adds(stages):
    for stage in stages[1:]:
        for instruction in stage:
            assert instruction.name != "ADD", "use COPY; ADD fetches URLs and unpacks archives implicitly"
            if instruction.name == "RUN" and "apt-get install" in instruction.args:
                assert "--no-install-recommends" in instruction.args and "rm -rf /var/lib/apt/lists" in instruction.args
            if instruction.name == "RUN" and "pip install" in instruction.args:
                assert "--no-cache-dir" in instruction.args


def test_the_image_copies_every_package_setup_cfg_installs(stages):
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    # package_dir lines read "conflux.daemon = daemon": the folder each package is installed from
    packages = {line.split("=")[1].strip() for line in setup["options"]["package_dir"].strip().splitlines()}
    copied: set[str] = set()
    for stage in stages[1:]:
        for instruction in stage:
            if instruction.name == "COPY" and not instruction.args.startswith("--from"):
                *sources, _ = instruction.args.split()
                for source in sources:
                    assert (REPO / source).exists(), f"COPY {source}: not in the build context"
                    copied.add(source.rstrip("/"))
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    assert {"setup.cfg", "pyproject.toml", "README.md"} <= copied  # README.md: setup.cfg's long_description
    kept = {line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    assert copied <= kept, f"copied but excluded from the build context: {copied - kept}"


# -- docker-compose.yml ---------------------------------------------------------------------------

VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")
# What deploy/.env must set for the stack to start (Compose refuses ${VAR:?...} when it is empty).
REQUIRED = {"CONTROL_TOKEN": "ctl-token-from-dot-env"}


class ComposeRefused(Exception):
    """Compose would stop here: a ${VAR:?message} whose variable is unset or empty."""


def interpolate(value, env: dict[str, str]):
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR
    and $$ for a literal $."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        if match.group(2) == ":-":
            return env.get(name) or match.group(3)
        if match.group(2) == "-":
            return env.get(name, match.group(3))
        if match.group(2) in (":?", "?") and (name not in env or (match.group(2) == ":?" and not env[name])):
            raise ComposeRefused(f"{name}: {match.group(3)}")
        return env.get(name, "")

    return VARIABLE.sub(substitute, value)


def compose(env: dict[str, str] | None = None) -> dict:
    """The compose file as Compose reads it with ``env`` (deploy/.env) on top of the required values."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), {**REQUIRED, **(env or {})})


def environment_of(service: dict) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def replica_config(services: dict, final_stage: list[Instruction]):
    """The config a Conflux replica loads: its mounted file, the image's ENV, then the service's."""
    service = services["conflux"]
    mounts = dict(volume.split(":")[:2][::-1] for volume in service["volumes"])
    config_file = DEPLOY / mounts["/etc/conflux/conflux.toml"]
    return load_config(config_file, environ={**image_env(final_stage), **environment_of(service)})


def test_the_stack_has_three_kraft_brokers_conflux_the_demo_world_and_prometheus():
    services = compose()["services"]
    assert set(services) == {*BROKERS, "conflux", "upstream", "analytics", "prometheus"}
    envs = [environment_of(services[name]) for name in BROKERS]
    assert sorted(int(env["KAFKA_NODE_ID"]) for env in envs) == [1, 2, 3]
    voters = {f"{env['KAFKA_NODE_ID']}@{name}:9093" for name, env in zip(BROKERS, envs, strict=True)}
    for name, env in zip(BROKERS, envs, strict=True):
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert "PLAINTEXT://:9092" in env["KAFKA_LISTENERS"] and "CONTROLLER://:9093" in env["KAFKA_LISTENERS"]
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3" and env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert services[name]["image"].startswith("apache/kafka:")
    assert len({env["CLUSTER_ID"] for env in envs}) == 1


def test_every_image_is_pinned_and_every_service_has_a_healthcheck(final):
    for name, service in compose()["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        if name == "conflux":
            assert "healthcheck" not in service and first(final, "HEALTHCHECK"), "conflux uses the image's"
        else:
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name


def test_replicas_and_partitions_come_from_the_environment(final):
    services = compose()["services"]
    assert services["conflux"]["deploy"]["replicas"] == "3"
    scaled = compose({"CONFLUX_REPLICAS": "5", "CONFLUX_LOG_PARTITIONS": "24", "CONFLUX_CONSUMERS": "4"})["services"]
    assert scaled["conflux"]["deploy"]["replicas"] == "5"
    config = replica_config(scaled, final)
    assert config.log.partitions == 24 and config.workers.consumers == 4
    assert environment_of(scaled["kafka-1"])["KAFKA_NUM_PARTITIONS"] == "24"
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    consumers_in_all = int(example["CONFLUX_REPLICAS"]) * int(example["CONFLUX_CONSUMERS"])
    assert int(example["CONFLUX_LOG_PARTITIONS"]) >= consumers_in_all


def test_each_replica_points_at_the_brokers_the_demo_world_and_listens_for_prometheus(final):
    services = compose()["services"]
    config = replica_config(services, final)
    assert config.log.backend == "kafka" and config.log.replication_factor == 3
    assert set(config.log.bootstrap_servers.split(",")) == {f"{name}:9092" for name in BROKERS}
    upstream_port = flag(services["upstream"]["command"], "--port")
    for source in config.sources:
        assert urlsplit(source.url).netloc == f"upstream:{upstream_port}", source.url
    assert urlsplit(config.sink.url).netloc == f"analytics:{flag(services['analytics']['command'], '--port')}"
    assert config.control.listen == f"0.0.0.0:{CONTROL_PORT}"
    partitions_per_replica = int(services["conflux"]["deploy"]["replicas"]) * config.workers.consumers
    assert config.log.partitions >= partitions_per_replica, "some consumers would have no partition"


def test_the_upstream_signs_webhooks_with_the_secret_conflux_checks(final):
    services = compose()["services"]
    command = services["upstream"]["command"]
    assert flag(command, "--webhook-url") == f"http://conflux:{CONTROL_PORT}/webhook/{{collection}}"
    env = environment_of(services["conflux"])
    config = replica_config(services, final)
    for source in config.sources:
        assert env[source.webhook_secret_env] == flag(command, "--webhook-secret")


def test_the_stack_needs_a_control_token_that_reaches_every_replica(final):
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    assert "CONTROL_TOKEN" in example and not example["CONTROL_TOKEN"], "the example must not ship a usable token"
    raw = yaml.safe_load(COMPOSE.read_text())
    for env in ({}, example):  # no deploy/.env, or the example copied unedited: Compose stops
        with pytest.raises(ComposeRefused, match="CONTROL_TOKEN"):
            interpolate(raw, env)
    config = replica_config(compose({"CONTROL_TOKEN": "s3cr3t"})["services"], final)
    assert config.control.listen.startswith("0.0.0.0:") and config.control.token_env == "CONTROL_TOKEN"
    assert environment_of(compose({"CONTROL_TOKEN": "s3cr3t"})["services"]["conflux"])["CONTROL_TOKEN"] == "s3cr3t"
    # Prometheus scrapes /metrics and the upstream posts signed webhooks: neither needs the token.
    assert not config.control.metrics_require_token


def test_conflux_stops_gracefully_and_starts_after_its_dependencies():
    service = compose()["services"]["conflux"]
    assert service["stop_signal"] == "SIGTERM"
    assert int(service["stop_grace_period"].rstrip("s")) >= DaemonConfig().shutdown_timeout_s + 10
    assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert {name for name, dep in service["depends_on"].items() if dep["condition"] == "service_healthy"} == {
        *BROKERS, "upstream", "analytics"}
    assert int(service["shm_size"].rstrip("m")) >= 128


def test_prometheus_scrapes_every_conflux_replica_on_its_metrics_endpoint():
    prometheus = compose()["services"]["prometheus"]
    mounts = dict(volume.split(":")[:2][::-1] for volume in prometheus["volumes"])
    config_dir = DEPLOY / mounts["/etc/prometheus"]
    scrape = yaml.safe_load((config_dir / "prometheus.yml").read_text())
    job = next(job for job in scrape["scrape_configs"] if job["job_name"] == "conflux")
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"] == [{"names": ["conflux"], "type": "A", "port": CONTROL_PORT,
                                      "refresh_interval": "30s"}]
    for rule_file in scrape["rule_files"]:
        assert (config_dir / rule_file).exists(), rule_file


def test_promtool_accepts_the_prometheus_config():
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian package: prometheus; .ci/run installs it)"
    proc = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
