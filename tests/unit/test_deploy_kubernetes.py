"""Offline checks of the deployment files: the KubeRay and Prometheus-operator manifests, the image, the compose stack.

Nothing here reaches a cluster or a Docker daemon. What each check stands on:

- Kubernetes built-in kinds: the PersistentVolumeClaims with ``kubernetes_validate.validate`` (the Kubernetes OpenAPI
  schemas bundled by the kubernetes-validate package, strict: unknown fields fail); the pod spec inside every
  RayService pod template and every object's metadata against the same bundled definitions.
- CRDs (RayService, PodMonitor, ServiceMonitor): jsonschema against the excerpts of their ``openAPIV3Schema`` vendored
  in ``deploy/kubernetes/schemas/`` (sources, commits and excerpt rules in its README.md), with Kubernetes'
  structural-schema semantics added as keywords rather than by loosening the schemas: an object schema with
  ``properties`` and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields`` is closed (the API
  server prunes unknown fields, and kubectl's default strict field validation rejects them), ``nullable``,
  ``x-kubernetes-int-or-string``, ``x-kubernetes-list-type`` set/map uniqueness, and the int32/int64 formats.
- ``serveConfigV2``: Ray's own ``ServeDeploySchema``, no key that Ray would silently ignore, and equal to
  ``deploy/serve_config_cluster.yaml`` (which tests/unit/test_config.py checks against tsugiki's settings).
- Cross-references that no schema knows: volumes against the serve config's paths, ports against the monitors,
  image tags against the Dockerfile, compose mounts against the files they mount.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from jsonschema import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKER = DEPLOY / "docker"

# The oldest Kubernetes version every kubernetes-validate>=1.28 ships schemas for; the manifests use nothing newer.
K8S_VERSION = "1.28.0"
DEFS_URI = "https://kubernetes.io/api/_definitions.json"
CRD_SCHEMAS = {"RayService": "rayservice.json", "PodMonitor": "podmonitor.json",
               "ServiceMonitor": "servicemonitor.json"}


# ---- a validator with Kubernetes' structural-schema semantics --------------------------------------------------------

_BASE = jsonschema.Draft202012Validator


def _closed_properties(validator: Any, properties: dict[str, Any], instance: Any, schema: dict[str, Any]
                       ) -> Iterator[ValidationError]:
    yield from _BASE.VALIDATORS["properties"](validator, properties, instance, schema)
    if (validator.is_type(instance, "object") and "additionalProperties" not in schema
            and "patternProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields")):
        for key in sorted(set(instance) - set(properties)):
            yield ValidationError(f"unknown field {key!r}; this object takes {', '.join(sorted(properties))}",
                                  path=(key,))


def _nullable_type(validator: Any, types: Any, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if instance is None and schema.get("nullable") is True:
        return
    yield from _BASE.VALIDATORS["type"](validator, types, instance, schema)


def _int_or_string(validator: Any, enabled: bool, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if enabled and not (validator.is_type(instance, "integer") or validator.is_type(instance, "string")):
        yield ValidationError(f"{instance!r} is neither an integer nor a string (x-kubernetes-int-or-string)")


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        names = schema.get("x-kubernetes-list-map-keys", [])
        keys = [json.dumps([item.get(n) for n in names]) for item in instance if isinstance(item, dict)]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        yield ValidationError(f"duplicate entries {duplicates} in a list of type {list_type!r}")


def _not_vendored(validator: Any, why: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    yield ValidationError(f"the schema of this field is not vendored ({why}); add it to deploy/kubernetes/schemas/ "
                          "from the source its file names before using the field")


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


KubeValidator = jsonschema.validators.extend(_BASE, {
    "properties": _closed_properties,
    "type": _nullable_type,
    "x-kubernetes-int-or-string": _int_or_string,
    "x-kubernetes-list-type": _list_type,
    "x-tsugiki-not-vendored": _not_vendored,
})


@cache
def k8s_definitions() -> tuple[dict[str, Any], str]:
    """kubernetes-validate's strict definitions for K8S_VERSION, and the key they sit under."""
    bundle = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    folder = bundle / f"v{K8S_VERSION}-local-strict"
    defs = json.loads((folder / "_definitions.json").read_text())
    return defs, "$defs" if "$defs" in defs else "definitions"


def _resolve_markers(node: Any) -> Any:
    """Replace each x-tsugiki-kubernetes-definition marker with a $ref into the bundled Kubernetes definitions."""
    defs, key = k8s_definitions()
    if isinstance(node, dict):
        name = node.get("x-tsugiki-kubernetes-definition")
        if name is not None:
            assert name in defs[key], f"kubernetes-validate {K8S_VERSION} has no definition {name}"
            return {"$ref": f"{DEFS_URI}#/{key}/{name}"}
        return {k: _resolve_markers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_markers(v) for v in node]
    return node


@cache
def k8s_registry() -> Registry:
    defs, _ = k8s_definitions()
    return Registry().with_resource(DEFS_URI, Resource.from_contents(defs, DRAFT202012))


def kube_validator(schema: dict[str, Any]) -> Any:
    return KubeValidator(schema, registry=k8s_registry(), format_checker=FORMATS)


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    vendored = json.loads((K8S / "schemas" / CRD_SCHEMAS[kind]).read_text())
    return dict(_resolve_markers(vendored["openAPIV3Schema"]))


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of a custom resource and of its metadata, as 'path: message' lines."""
    _, key = k8s_definitions()
    found = [(list(e.absolute_path), e.message) for e in kube_validator(crd_schema(doc["kind"])).iter_errors(doc)]
    meta = kube_validator({"$ref": f"{DEFS_URI}#/{key}/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"})
    found += [(["metadata", *e.absolute_path], e.message) for e in meta.iter_errors(doc.get("metadata", {}))]
    return [f"{'.'.join(map(str, path)) or '<root>'}: {message}" for path, message in found]


# ---- the files -------------------------------------------------------------------------------------------------------

def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict[str, Any]:
    docs = [d for d in load_all(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def rayservice() -> dict[str, Any]:
    return one(K8S / "rayservice.yaml", "RayService")


def pod_templates(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod templates by group: 'head' and each worker group's name."""
    cluster = rs["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return {name: g["template"] for name, g in groups.items()}


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]  # KubeRay: the Ray container is the first one (RayContainerIndex = 0)


def mounts(template: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """mountPath -> (claimName or volume type, subPath)."""
    volumes = {}
    for v in template["spec"].get("volumes", []):
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        volumes[v["name"]] = claim or next(k for k in v if k != "name")
    return {m["mountPath"]: (volumes[m["name"]], m.get("subPath")) for m in ray_container(template)["volumeMounts"]}


def serve_config() -> dict[str, Any]:
    return dict(yaml.safe_load(rayservice()["spec"]["serveConfigV2"]))


def tsugiki_app(config: dict[str, Any]) -> dict[str, Any]:
    return next(a for a in config["applications"] if a["import_path"] == "tsugiki.serve.deployments:app_builder")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    logical, out = "", []
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") and not logical:
            continue
        continued = line.rstrip().endswith("\\")
        logical += line.rstrip()[:-1].strip() + " " if continued else line.strip()
        if not continued:
            if logical:
                word, _, rest = logical.partition(" ")
                out.append((word.upper(), rest.strip()))
            logical = ""
    return out


def dockerfile_arg(name: str) -> str:
    for word, rest in dockerfile_instructions():
        if word == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"deploy/docker/Dockerfile declares no default for ARG {name}")


# ---- Kubernetes manifests: schemas -----------------------------------------------------------------------------------

def test_pvcs_validate_with_kubernetes_schema() -> None:
    claims = load_all(K8S / "pvc.yaml")
    for claim in claims:
        kubernetes_validate.validate(claim, K8S_VERSION, strict=True)
    modes = {c["metadata"]["name"]: c["spec"]["accessModes"] for c in claims}
    assert modes == {"tsugiki-shared": ["ReadWriteMany"], "tsugiki-registry": ["ReadWriteOnce"]}
    with pytest.raises(kubernetes_validate.ValidationError, match=r"'resource' was unexpected"):
        kubernetes_validate.validate(_set(claims[0], "spec.resource", {}), K8S_VERSION, strict=True)


@pytest.mark.parametrize(("manifest", "kind"), [("rayservice.yaml", "RayService"), ("monitoring.yaml", "PodMonitor"),
                                                ("monitoring.yaml", "ServiceMonitor")])
def test_custom_resources_validate_with_vendored_crd_schemas(manifest: str, kind: str) -> None:
    doc = one(K8S / manifest, kind)
    source = json.loads((K8S / "schemas" / CRD_SCHEMAS[kind]).read_text())["source"]
    assert doc["apiVersion"] == f"{source['group']}/{source['version']}" and source["kind"] == kind
    assert crd_errors(doc) == []


def test_every_kind_in_the_manifests_is_checked() -> None:
    kinds = {d["kind"] for f in ("pvc.yaml", "rayservice.yaml", "monitoring.yaml") for d in load_all(K8S / f)}
    assert kinds == {"PersistentVolumeClaim", *CRD_SCHEMAS}


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[last] = value
    return doc


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("spec.rayClusterConfig.headGroupSpec.rayStartParam", {}, r"unknown field 'rayStartParam'"),
    ("spec.rayClusterConfig.workerGroupSpecs.1.rayStartParams.num-gpus", 1, r"1 is not of type 'string'"),
    ("spec.rayClusterConfig.workerGroupSpecs.1.maxReplicas", 2**40, r"is not a 'int32'"),
    ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.imagePullPolicy", 3, r"3 is not of type"),
    ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.port", [], r"'port' was unexpected"),
    ("spec.serveService", {}, r"schema of this field is not vendored"),
    ("metadata.labelz", {}, r"'labelz' was unexpected"),
])
def test_the_crd_validator_rejects_what_kubernetes_would(path: str, value: Any, expected: str) -> None:
    errors = crd_errors(_set(rayservice(), path, value))
    assert any(re.search(expected, e) for e in errors), errors


def test_the_crd_validator_checks_monitors_and_kubernetes_list_semantics() -> None:
    pod_monitor = one(K8S / "monitoring.yaml", "PodMonitor")
    bad_scheme = _set(pod_monitor, "spec.podMetricsEndpoints.0.scheme", "tcp")
    assert any("'tcp' is not one of" in e for e in crd_errors(bad_scheme))
    protocols = _set(pod_monitor, "spec.scrapeProtocols", ["PrometheusProto", "PrometheusProto"])
    assert any("duplicate entries" in e for e in crd_errors(protocols))
    service_monitor = one(K8S / "monitoring.yaml", "ServiceMonitor")
    assert any("'endpoints' is a required property" in e
               for e in crd_errors({**service_monitor, "spec": {"selector": {}}}))


# ---- Kubernetes manifests: what no schema knows ----------------------------------------------------------------------

def test_serve_config_v2_is_the_cluster_serve_config_and_valid_for_ray() -> None:
    from ray.serve.schema import ServeDeploySchema

    text = rayservice()["spec"]["serveConfigV2"]
    config = yaml.safe_load(text)
    parsed = ServeDeploySchema(**config)
    dumped = parsed.model_dump(exclude_unset=True) if hasattr(parsed, "model_dump") else parsed.dict(exclude_unset=True)

    def ignored(given: Any, kept: Any, where: str) -> list[str]:
        """Keys Ray's schema accepted but dropped (pydantic ignores unknown fields); `args` is tsugiki's own."""
        if isinstance(given, dict) and isinstance(kept, dict):
            return [f"{where}{k}" for k in given if k not in kept] + [
                x for k in given if k in kept and k != "args" for x in ignored(given[k], kept[k], f"{where}{k}.")]
        if isinstance(given, list) and isinstance(kept, list):
            return [x for i, (g, k) in enumerate(zip(given, kept)) for x in ignored(g, k, f"{where}{i}.")]
        return []

    assert ignored(config, dumped, "") == []
    cluster = yaml.safe_load((DEPLOY / "serve_config_cluster.yaml").read_text())
    assert config["applications"] == cluster["applications"], \
        "serveConfigV2 in deploy/kubernetes/rayservice.yaml differs from deploy/serve_config_cluster.yaml: copy it over"
    assert config == cluster, "serveConfigV2's top-level settings differ from deploy/serve_config_cluster.yaml"


def test_rayservice_places_the_controller_on_the_head_with_the_registry() -> None:
    rs = rayservice()
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", rs["metadata"]["name"]) and len(rs["metadata"]["name"]) <= 47
    app = tsugiki_app(serve_config())
    controller = next(d for d in app["deployments"] if d["name"] == "Controller")
    assert controller["num_replicas"] == 1 and "node:__internal_head__" in controller["ray_actor_options"]["resources"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert float(head["rayStartParams"]["num-cpus"]) >= controller["ray_actor_options"]["num_cpus"], \
        "the head must offer CPUs: the Controller deployment is pinned to it"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    registry_dir = str(PurePosixPath(app["args"]["registry"]["path"]).parent)
    templates = pod_templates(rs)
    assert mounts(templates["head"])[registry_dir] == ("tsugiki-registry", None)
    for group, template in templates.items():
        assert all(claim != "tsugiki-registry" for claim, _ in mounts(template).values()) or group == "head", \
            f"group {group} mounts the registry volume: only the head may (SQLite on one host)"


def test_rayservice_volumes_hold_every_path_the_serve_config_names() -> None:
    args = tsugiki_app(serve_config())["args"]
    shared_paths = [args["adapters"]["store_dir"], *args["adapters"]["roots"], args["monitor"]["state_dir"]]
    claims = {c["metadata"]["name"] for c in load_all(K8S / "pvc.yaml")}
    for group, template in pod_templates(rayservice()).items():
        on_pod = mounts(template)
        assert {claim for claim, _ in on_pod.values()} <= claims | {"emptyDir"}, f"{group}: a claim pvc.yaml lacks"
        for path in [*shared_paths, args["model"]["base_model"]]:
            mount = next((m for m in sorted(on_pod, key=len, reverse=True)
                          if PurePosixPath(path).is_relative_to(m)), None)
            assert mount is not None and on_pod[mount][0] == "tsugiki-shared", \
                f"{group}: {path} (serve config) is not on the shared volume"


def test_rayservice_groups_images_gpus_and_ports() -> None:
    rs = rayservice()
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == dockerfile_arg("RAY_VERSION")
    templates = pod_templates(rs)
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    tags = set()
    for name, template in templates.items():
        container = ray_container(template)
        image, tag = container["image"].rsplit(":", 1)
        tags.add(tag.rsplit("-", 1)[0])
        assert image == "ghcr.io/tsugiki/tsugiki" and tag.endswith("-gpu" if name == "gpu" else "-cpu"), name
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        params = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"] if name == "head" \
            else groups[name]["rayStartParams"]
        assert (str(gpus), params.get("num-gpus")) == (("1", "1") if name == "gpu" else ("None", None)), name
        assert params.get("metrics-export-port", "8080") == "8080"
    assert len(tags) == 1, f"the groups run different image versions: {tags}"
    ports = {p["name"]: p["containerPort"] for p in ray_container(templates["head"])["ports"]}
    assert {"metrics": 8080, "serve": 8000, "dashboard": 8265, "gcs-server": 6379}.items() <= ports.items()
    llm = next(d for d in tsugiki_app(serve_config())["deployments"] if d["name"] == "LLMServer")
    assert groups["gpu"]["maxReplicas"] >= llm["autoscaling_config"]["max_replicas"]


def test_monitors_select_the_rayservice_pods_and_serve_service() -> None:
    rs = rayservice()
    name = rs["metadata"]["name"]
    pod_monitor = one(K8S / "monitoring.yaml", "PodMonitor")
    wanted = pod_monitor["spec"]["selector"]["matchLabels"]
    for group, template in pod_templates(rs).items():
        assert wanted.items() <= template["metadata"]["labels"].items(), f"PodMonitor misses the {group} pods"
        ports = {p["name"] for p in ray_container(template)["ports"]}
        assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= ports, group
    # KubeRay's serve Service: <name>-serve-svc, labelled ray.io/serve=<name>-serve, one port named `serve`.
    service_monitor = one(K8S / "monitoring.yaml", "ServiceMonitor")
    assert service_monitor["spec"]["selector"]["matchLabels"] == {"ray.io/serve": f"{name}-serve"}
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] == "serve" and endpoint["path"] == "/metrics"
    (address,) = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "__address__"]
    assert address["replacement"].startswith(f"{name}-serve-svc.")


# ---- the image and the local stack -----------------------------------------------------------------------------------

def test_dockerfile_lint() -> None:
    instructions = dockerfile_instructions()
    froms = [rest.split() for word, rest in instructions if word == "FROM"]
    images = [f[0] for f in froms]
    assert dockerfile_arg("VARIANT") == "cpu"
    assert "python:3.11-slim" in images and any(re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-py311-gpu", i)
                                                 for i in images)
    assert images[-1] == "base-${VARIANT}", "the last stage picks the variant's base"
    for image in images:
        assert ":" in image or image.startswith("base-"), f"FROM {image}: pin a tag"
        assert not image.endswith(":latest"), f"FROM {image}: no latest tags"
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must run as a non-root user"
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs and "tsugiki convert" in runs
    (healthcheck,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert ("EXPOSE", "8000") in instructions
    (entrypoint,) = [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    assert entrypoint == ["tsugiki", "serve", "--host", "0.0.0.0"]
    env = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "TSUGIKI_HOME=/var/lib/tsugiki" in env


def test_dockerignore_keeps_the_context_small_and_the_package_data() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert {".git", ".venv", "benchmarks/results", "**/__pycache__"} <= set(patterns)
    assert not any(p.strip("/") in ("tests", "tests/data", "tests/data/clinc150") for p in patterns), \
        "tests/data/clinc150 is package data (pyproject.toml): the image build needs it"


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DOCKER / "compose.yaml").read_text()))


# Host paths the compose stack mounts, relative to deploy/docker/; the files come from the other parts of deploy/.
COMPOSE_MOUNTS = ["../prometheus/prometheus.yml", "../prometheus/rules", "../alertmanager/alertmanager.yml",
                  "../grafana/provisioning", "../grafana/dashboards"]


def test_compose_services_images_and_admin_key() -> None:
    stack = compose()
    services = stack["services"]
    assert set(services) == {"gateway", "prometheus", "alertmanager", "grafana"}
    build = services["gateway"]["build"]
    assert (DOCKER / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKER / "Dockerfile" and build["args"]["VARIANT"] == "cpu"
    for name, service in services.items():
        image = service["image"]
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{name}: pin {image}"
    bind_sources = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if v.startswith(".")}
    assert bind_sources == set(COMPOSE_MOUNTS)
    (secret,) = services["alertmanager"]["secrets"]
    assert secret["target"] == "/etc/alertmanager/tsugiki-admin-key"
    variable = stack["secrets"][secret["source"]]["environment"]
    assert re.match(rf"\$\{{{variable}[:?}}]", services["gateway"]["environment"]["TSUGIKI_SERVER__ADMIN_KEY"]), \
        "the gateway's admin key and Alertmanager's must come from the same variable"
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "/etc/grafana/provisioning" in " ".join(services["grafana"]["volumes"])


@pytest.mark.parametrize("source", COMPOSE_MOUNTS)
def test_compose_mounts_exist(source: str) -> None:
    path = (DOCKER / source).resolve()
    assert path.exists(), f"deploy/docker/compose.yaml mounts {path.relative_to(ROOT)}, which does not exist"


def test_the_guide_names_files_that_exist() -> None:
    text = (DEPLOY / "README.md").read_text()
    named = set(re.findall(r"deploy/(?:kubernetes|docker)/[\w./-]*\w", text))
    assert {"deploy/kubernetes/pvc.yaml", "deploy/kubernetes/rayservice.yaml", "deploy/kubernetes/monitoring.yaml",
            "deploy/docker/compose.yaml", "deploy/docker/Dockerfile"} <= named
    assert sorted(p for p in named if not (ROOT / p).exists()) == []
