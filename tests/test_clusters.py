"""The cluster configurations in clusters/: valid for Ray's own validators, and private by construction.

Cloud launcher YAMLs go through the functions `ray up` itself runs before touching a cloud
(`prepare_config` fills Ray's provider defaults, `validate_config` checks Ray's JSON schema and its
cross-field rules). The RayCluster goes through the translation that the KubeRay autoscaler runs on
the head pod. Security rules are asserted on the parsed values; nothing here reaches a network.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private import util as ray_util

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
KUBE_FILES = ["kuberay-cluster.yaml", "kuberay-job.yaml"]
SLURM_FILE = "slurm.sbatch"
# Google's Identity-Aware Proxy forwards SSH from this range, and only SSH may come from it.
IAP_RANGE = ipaddress.ip_network("35.235.240.0/20")


def load(name: str):
    return yaml.safe_load((CLUSTERS / name).read_text())


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((CLUSTERS / name).read_text()) if doc is not None]


def walk(node, path=()):
    """Every (path, key, value) in a nested YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from walk(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, path + (index,))


def worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def ray_start_commands(config: dict) -> list[str]:
    commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [c for c in commands if "ray start" in c]


# ---------------------------------------------------------------------------------------------
# Every file in clusters/ is one of the kinds checked below.


def test_every_cluster_file_is_checked():
    present = {p.name for p in CLUSTERS.iterdir() if p.is_file()}
    assert present == set(LAUNCHER_FILES) | set(KUBE_FILES) | {SLURM_FILE, "README.md"}


# ---------------------------------------------------------------------------------------------
# Cloud launcher configurations (AWS, GCP).


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_rays_validator(name):
    config = load(name)
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    ray_util.validate_config(prepared)  # raises on any schema or cross-field error
    # prepare_config merged our common setup into both node roles, as `ray up` will run them.
    assert prepared["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert prepared["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert prepared["provider"]["type"] == name.removesuffix(".yaml")


SPOILERS = {
    "unknown-field": lambda c: c["available_node_types"]["head"].update(bogus_field=1),
    "fractional-node-gpus": lambda c: c["available_node_types"]["gpu_8x_a10g"]["resources"].update(GPU=0.5),
    "min-workers-above-global-max": lambda c: c["available_node_types"]["gpu_8x_a10g"].update(min_workers=9),
    "unknown-head-type": lambda c: c.update(head_node_type="missing"),
}


@pytest.mark.parametrize("spoil", list(SPOILERS.values()), ids=list(SPOILERS))
def test_rays_validator_rejects_spoiled_configs(spoil):
    """The validator above is live: the same path fails on configs Ray would refuse."""
    config = load("aws.yaml")
    spoil(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_util.validate_config(ray_util.prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_has_a_cpu_head_and_autoscaling_multi_gpu_workers(name):
    config = load(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] >= 4
    gpu_types = {n: t for n, t in worker_types(config).items() if t["resources"].get("GPU", 0) >= 2}
    assert gpu_types, "no multi-GPU worker type"
    for node_type in gpu_types.values():
        assert isinstance(node_type["resources"]["GPU"], int)  # trials take fractions of these
        assert node_type["min_workers"] == 0  # scales from zero
    assert max(t["max_workers"] for t in gpu_types.values()) >= 1
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())


def test_aws_nodes_have_no_public_address_and_our_security_group():
    config = load("aws.yaml")
    assert config["provider"]["use_internal_ips"] is True
    # A Ray-made security group always opens SSH to 0.0.0.0/0; ours is named on every interface.
    assert "security_group" not in config["provider"]
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & node.keys(), name
        interfaces = node["NetworkInterfaces"]
        assert interfaces, name
        for interface in interfaces:
            assert interface["AssociatePublicIpAddress"] is False, name
            assert interface["Groups"] and interface["SubnetId"], name
        assert node["MetadataOptions"]["HttpTokens"] == "required", name


def test_gcp_nodes_have_no_external_address_and_carry_the_firewall_tag():
    config = load("gcp.yaml")
    assert config["provider"]["use_internal_ips"] is True
    for name, node_type in config["available_node_types"].items():
        node = node_type["node_config"]
        # Without networkInterfaces Ray adds one with an external NAT address.
        interfaces = node["networkInterfaces"]
        assert interfaces, name
        for interface in interfaces:
            assert "accessConfigs" not in interface and "ipv6AccessConfigs" not in interface, name
            assert interface["subnetwork"], name
        assert "gradinv-ray" in node["tags"]["items"], name


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_keeps_token_auth_and_a_loopback_dashboard(name):
    config = load(name)
    text = (CLUSTERS / name).read_text()
    starts = ray_start_commands(config)
    assert len(starts) == 2  # head and worker
    for command in starts:
        assert "RAY_AUTH_MODE=token ray start" in command
    head_start = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start
    values = [v for _, _, v in walk(config) if isinstance(v, str)]
    assert not any("0.0.0.0" in v for v in values)
    assert not re.search(r"RAY_AUTH_MODE\s*=\s*['\"]?disabled", text)
    # The token reaches every node from the launching machine, readable by its owner only.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in " ".join(config["setup_commands"])
    # Interactive shells and job drivers on the nodes see token mode too.
    assert any("export RAY_AUTH_MODE=token" in c for c in config["setup_commands"])


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_installs_gradinv_and_syncs_storage(name):
    config = load(name)
    setup = " ".join(config["setup_commands"])
    assert '"ray[default]==2.60.0"' in setup
    assert "~/gradinv/dist/gradinv-*.whl" in setup and config["file_mounts"]["~/gradinv/dist"] == "./dist"
    assert "GRADINV_DATA=" in setup and "GRADINV_CACHE=" in setup
    scheme = {"aws.yaml": "s3://", "gcp.yaml": "gs://"}[name]
    assert f"{scheme}YOUR_BUCKET/gradinv/data" in setup
    results_sync = " ".join(config["head_setup_commands"])
    assert f"{scheme}YOUR_BUCKET/gradinv/results" in results_sync
    # Hidden files (batches being written, the writer's lock) never reach the bucket.
    hidden = {"aws.yaml": '--exclude ".*" --exclude "*/.*"', "gcp.yaml": '--exclude="^(.*/)?\\.[^/]*$"'}[name]
    assert hidden in results_sync


# ---------------------------------------------------------------------------------------------
# Firewall rules: Ray's YAML cannot hold them, so README.md gives the commands; check those.


def readme_commands(marker: str) -> list[str]:
    text = (CLUSTERS / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.DOTALL)
    commands = []
    for block in blocks:
        for command in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            if marker in command:
                commands.append(command.strip())
    return commands


def test_aws_security_group_rules_admit_only_the_group_or_private_ranges():
    rules = readme_commands("authorize-security-group-ingress")
    assert rules, "README.md lost the security group rules"
    assert any("--source-group" in r or "UserIdGroupPairs" in r for r in rules)
    for rule in rules:
        cidrs = re.findall(r"(?:--cidr[ =]|CidrIp=)([0-9./]+)", rule)
        assert cidrs or "--source-group" in rule or "UserIdGroupPairs" in rule, rule
        for cidr in cidrs:
            assert ipaddress.ip_network(cidr).is_private, rule


def test_gcp_firewall_rules_admit_only_the_subnet_or_iap_ssh():
    rules = readme_commands("firewall-rules create")
    assert rules, "README.md lost the firewall rules"
    for rule in rules:
        args = shlex.split(rule)
        options = dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)
        assert options.get("--direction", "INGRESS") == "INGRESS" and options["--action"] == "ALLOW", rule
        assert "--target-tags" in options and options["--target-tags"] == "gradinv-ray", rule
        # Without --source-ranges a GCP rule admits 0.0.0.0/0.
        ranges = [ipaddress.ip_network(r) for r in options["--source-ranges"].split(",")]
        for network in ranges:
            if network == IAP_RANGE:
                assert options["--rules"] == "tcp:22", rule
            else:
                assert network.is_private, rule


# ---------------------------------------------------------------------------------------------
# Kubernetes (KubeRay) manifests.


def kube_objects() -> list[dict]:
    return [doc for name in KUBE_FILES for doc in load_all(name)]


def cluster_specs() -> list[dict]:
    specs = []
    for doc in kube_objects():
        if doc["kind"] == "RayCluster":
            specs.append(doc["spec"])
        elif doc["kind"] == "RayJob":
            specs.append(doc["spec"]["rayClusterSpec"])
    return specs


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_kube_manifests_hold_the_expected_objects():
    kinds = {name: [d["kind"] for d in load_all(name)] for name in KUBE_FILES}
    assert kinds == {
        "kuberay-cluster.yaml": ["NetworkPolicy", "RayCluster"],
        "kuberay-job.yaml": ["NetworkPolicy", "RayJob"],
    }
    for doc in kube_objects():
        assert doc["apiVersion"] in {"ray.io/v1", "networking.k8s.io/v1"}


def test_kube_nothing_is_exposed_outside_the_cluster_network():
    objects = kube_objects()
    for doc in objects:
        assert doc["kind"] not in {"Ingress", "Route", "Gateway", "HTTPRoute"}
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
        for path, key, value in walk(doc):
            assert not (key == "hostNetwork" and value is True), path
            assert key not in {"hostPort", "nodePort", "loadBalancerIP", "externalIPs"}, path
            assert not (key == "enableIngress" and value is True), path
            assert not (key == "type" and value in {"LoadBalancer", "NodePort"}), path
    specs = cluster_specs()
    assert len(specs) == 2
    for spec in specs:
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP"
        if "headService" in head:
            assert head["headService"]["spec"].get("type", "ClusterIP") == "ClusterIP"
        # All pod interfaces are fine only because the Service above is ClusterIP.
        assert head["rayStartParams"].get("dashboard-host", "127.0.0.1") in {"127.0.0.1", "0.0.0.0"}
        for template in pod_templates(spec):
            assert template["spec"].get("hostNetwork", False) is False
            assert template["spec"]["securityContext"]["runAsNonRoot"] is True
            for container in template["spec"]["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_kube_token_auth_comes_from_a_secret():
    for spec in cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": "gradinv-ray-token"}
        for template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                if "RAY_AUTH_MODE" in env:
                    assert env["RAY_AUTH_MODE"]["value"] == "token"
                if "RAY_AUTH_TOKEN" in env:
                    assert "value" not in env["RAY_AUTH_TOKEN"]
                    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "gradinv-ray-token"
    # No token is committed: the Secret is made by hand (README), never shipped with a value.
    for doc in kube_objects():
        assert doc["kind"] != "Secret"
        for _, key, _ in walk(doc):
            assert key not in {"stringData", "RAY_AUTH_TOKEN"}


def test_kube_network_policy_admits_only_this_namespace_and_the_operator():
    for name in KUBE_FILES:
        policy = next(d for d in load_all(name) if d["kind"] == "NetworkPolicy")
        workload = next(d for d in load_all(name) if d["kind"] != "NetworkPolicy")
        spec = workload["spec"] if workload["kind"] == "RayCluster" else workload["spec"]["rayClusterSpec"]
        selected = policy["spec"]["podSelector"]["matchLabels"]
        for template in pod_templates(spec):
            assert selected.items() <= template["metadata"]["labels"].items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
        assert {"podSelector": {}} in sources
        for peer in sources:
            assert "ipBlock" not in peer
            if "namespaceSelector" in peer:
                assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kuberay-system"}
    names = {next(d for d in load_all(n) if d["kind"] == "NetworkPolicy")["metadata"]["name"] for n in KUBE_FILES}
    assert len(names) == 2  # deleting the job's policy leaves the cluster's in place


def test_raycluster_passes_the_kuberay_autoscalers_translation():
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = next(d for d in load_all("kuberay-cluster.yaml") if d["kind"] == "RayCluster")
    cr = copy.deepcopy(cr)
    cr["metadata"]["namespace"] = "default"  # set by the API server on apply
    derived = _derive_autoscaling_config_from_ray_cr(cr)  # runs Ray's validate_config
    types = derived["available_node_types"]
    assert "GPU" not in types["headgroup"]["resources"]
    assert types["gpu-8x"]["resources"]["GPU"] == 8
    assert (types["gpu-8x"]["min_workers"], types["gpu-8x"]["max_workers"]) == (0, 8)
    assert derived["max_workers"] == 8
    # Kubernetes needs requests equal to limits for GPUs; Ray reads the limits.
    worker = cr["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert worker["requests"]["nvidia.com/gpu"] == worker["limits"]["nvidia.com/gpu"] == "8"


def test_rayjob_runs_a_study_on_the_same_cluster_spec():
    cluster = next(d for d in load_all("kuberay-cluster.yaml") if d["kind"] == "RayCluster")
    job = next(d for d in load_all("kuberay-job.yaml") if d["kind"] == "RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert entrypoint[:2] == ["gradinv", "run"] and entrypoint[2].endswith(".yaml")
    assert entrypoint[entrypoint.index("--results") + 1].startswith("/results/")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    head_mounts = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "results", "mountPath": "/results"} in head_mounts


# ---------------------------------------------------------------------------------------------
# Slurm.


def test_slurm_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    done = subprocess.run(
        [shellcheck, str(CLUSTERS / SLURM_FILE)], check=False, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_slurm_script_starts_an_authenticated_gpu_cluster_and_runs_the_study():
    text = (CLUSTERS / SLURM_FILE).read_text()
    directives = dict(
        re.match(r"#SBATCH --([\w-]+)(?:=(.*))?", line).groups()
        for line in text.splitlines()
        if line.startswith("#SBATCH ")
    )
    assert int(directives["gpus-per-node"]) >= 1
    assert "exclusive" in directives
    assert "export RAY_AUTH_MODE=token" in text and "export RAY_AUTH_TOKEN" in text
    assert not re.search(r"RAY_AUTH_MODE\s*=\s*['\"]?disabled", text)
    assert "0.0.0.0" not in text
    flat = re.sub(r"\s*\\\n\s*", " ", text)
    head = re.search(r"^srun .*ray start --head .*$", flat, flags=re.MULTILINE).group(0)
    worker = re.search(r"^\s*srun .*ray start --block --address.*$", flat, flags=re.MULTILINE).group(0)
    assert "--dashboard-host=127.0.0.1" in head
    for start in (head, worker):
        assert '--num-gpus="$gpus_per_node"' in start
        assert '--temp-dir="$temp_dir"' in start  # not the shared /tmp/ray
        assert 'bash -c "$in_private_dir" "$private_dir" ray start' in start  # inside a folder only its user enters
    assert 'temp_dir="$private_dir/ray"' in text and "mkdir -m 700" in text
    assert '--exclude="$head_node"' in worker
    assert re.search(r'^gradinv run "\$study" --results "\$results" --address "\$address"', flat, flags=re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# README.


def test_readme_covers_the_round_trip_and_the_cost_table():
    text = (CLUSTERS / "README.md").read_text()
    for heading in ["## AWS", "## Google Cloud", "## Kubernetes", "## Slurm", "## What a study costs"]:
        assert heading in text
    round_trip = [
        "ray get-auth-token --generate",
        "ray up clusters/aws.yaml",
        "ray down clusters/aws.yaml",
        "ray up clusters/gcp.yaml",
        "ray down clusters/gcp.yaml",
        "kubectl port-forward",
        "kubectl delete -f clusters/kuberay-cluster.yaml",
        "sbatch --nodes=4 clusters/slurm.sbatch studies/",
        "ray job submit",
        "gradinv status",
    ]
    for command in round_trip:
        assert command in text, command
    costs = text.split("## What a study costs", 1)[1]
    assert "benchmarks/attack_throughput.py" in costs
    assert "trials per GPU-hour" in costs
    assert re.search(r"^\|.*\|$", costs, flags=re.MULTILINE)  # a table
