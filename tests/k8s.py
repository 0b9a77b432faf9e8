"""Checks of Kubernetes manifests that need no API server (none can run here): rendering with
`kubectl kustomize`, the Kubernetes 1.37 schemas in strict mode (kubernetes-validate), and the
dask-kubernetes operator's CRD schemas from the installed wheel, made strict the way the API
server's strict field validation is (an unknown field is an error)."""

from __future__ import annotations

import copy
import functools
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.37.0"
DASK_KINDS = ("DaskJob", "DaskCluster", "DaskAutoscaler", "DaskWorkerGroup")


def render(folder) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _strict(schema):
    """Unknown fields are errors, except where the CRD keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@functools.cache
def crd_schema(kind: str) -> dict:
    import dask_kubernetes

    crds = Path(dask_kubernetes.__file__).parent / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
    crd = yaml.safe_load((crds / f"{kind.lower()}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served")]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # every object has these; a CRD's schema leaves them to the API server (ObjectMeta)
    schema["properties"] |= {"apiVersion": {"type": "string", "enum": [f"{crd['spec']['group']}/{version['name']}"]},
                             "kind": {"type": "string", "enum": [kind]}, "metadata": {"type": "object"}}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return schema


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every pod a resource describes."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "DaskJob":
        return [("job", spec["job"]), ("scheduler", spec["cluster"]["spec"]["scheduler"]),
                ("worker", spec["cluster"]["spec"]["worker"])]
    if kind == "DaskCluster":
        return [("scheduler", spec["scheduler"]), ("worker", spec["worker"])]
    if kind == "PyTorchJob":
        return [(role, r["template"]) for role, r in spec["pytorchReplicaSpecs"].items()]
    return []


def validate(doc: dict) -> None:
    """Raise (jsonschema's or kubernetes-validate's ValidationError) unless ``doc`` is valid."""
    kind = doc["kind"]
    if kind in DASK_KINDS:
        jsonschema.validate(doc, crd_schema(kind))
    elif kind == "PyTorchJob":
        # No schema of the Kubeflow training operator is installed here: its own fields are
        # checked by hand below, its pod templates against Kubernetes' PodTemplate.
        assert doc["apiVersion"] == "kubeflow.org/v1", doc["apiVersion"]
        assert set(doc["spec"]) <= {"pytorchReplicaSpecs", "nprocPerNode", "runPolicy", "elasticPolicy"}, doc["spec"]
        assert re.fullmatch(r"\d+|auto|cpu|gpu", str(doc["spec"].get("nprocPerNode", "auto")))
        for role, r in doc["spec"]["pytorchReplicaSpecs"].items():
            assert role in ("Master", "Worker"), role
            assert set(r) <= {"replicas", "restartPolicy", "template"}, r.keys()
            assert r["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
            assert [c["name"] for c in r["template"]["spec"]["containers"]][0] == "pytorch"
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # the pods inside custom resources, also against Kubernetes' own PodTemplate schema
    for where, template in pod_templates(doc):
        # (a Dask scheduler's entry also holds its Service: the pod is `metadata` and `spec`)
        pod = {k: copy.deepcopy(v) for k, v in template.items() if k in ("metadata", "spec")}
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                   "metadata": {"name": f"{doc['metadata']['name']}-{where}".lower()}, "template": pod}
        kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


def containers(doc: dict) -> list[dict]:
    """Every container of a resource (Pods, Jobs and the custom resources above)."""
    out = [c for _, t in pod_templates(doc) for c in t["spec"]["containers"]]
    if doc["kind"] in ("Job", "Deployment", "StatefulSet"):
        out += doc["spec"]["template"]["spec"]["containers"]
    return out


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion in command, args and env (`$$` escapes; an unknown
    variable is left as written)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)
