"""The fields and types of KubeRay's v1 custom resources (RayCluster, RayJob, RayService) that
cotd's manifests may use, as JSON Schema, transcribed from the operator's Go API types
(ray-operator/apis/ray/v1/*_types.go, KubeRay 1.x). Ray's own objects are closed: a field that is
not in the v1 API (a typo, a field of another version) fails, as `kubectl apply --validate=strict`
would. The Kubernetes core types inside them (pod templates, services) are checked for the parts
cotd uses and left open otherwise.
"""

from __future__ import annotations

from typing import Any

# resource.Quantity: an integer, or a string such as "500m", "64Gi", "1.5"
QUANTITY = {"anyOf": [{"type": "integer"},
                      {"type": "string", "pattern": r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?\d+)?$"}]}
INT32 = {"type": "integer", "minimum": -(2 ** 31), "maximum": 2 ** 31 - 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def open_(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required)}


def array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


RESOURCES = closed({"requests": {"type": "object", "additionalProperties": QUANTITY},
                    "limits": {"type": "object", "additionalProperties": QUANTITY},
                    "claims": array(open_({"name": {"type": "string"}}, ("name",)))})
ENV_VAR = closed({"name": {"type": "string"}, "value": {"type": "string"},
                  "valueFrom": open_({"secretKeyRef": open_({"name": {"type": "string"}, "key": {"type": "string"}}, ("key",)),
                                      "configMapKeyRef": open_({"name": {"type": "string"}, "key": {"type": "string"}}, ("key",)),
                                      "fieldRef": open_({"fieldPath": {"type": "string"}}, ("fieldPath",))})},
                 ("name",))
CONTAINER = open_({
    "name": {"type": "string"}, "image": {"type": "string"},
    "command": array({"type": "string"}), "args": array({"type": "string"}),
    "env": array(ENV_VAR),
    "ports": array(open_({"name": {"type": "string"}, "containerPort": INT32, "protocol": {"type": "string"}},
                         ("containerPort",))),
    "resources": RESOURCES,
    "volumeMounts": array(open_({"name": {"type": "string"}, "mountPath": {"type": "string"},
                                 "readOnly": {"type": "boolean"}, "subPath": {"type": "string"}},
                                ("name", "mountPath"))),
}, ("name",))
VOLUME = open_({"name": {"type": "string"},
                "persistentVolumeClaim": closed({"claimName": {"type": "string"}, "readOnly": {"type": "boolean"}},
                                                ("claimName",)),
                "emptyDir": closed({"medium": {"type": "string"}, "sizeLimit": QUANTITY})}, ("name",))
POD_TEMPLATE = open_({
    "metadata": open_({"labels": STRING_MAP, "annotations": STRING_MAP}),
    "spec": open_({"containers": {**array(CONTAINER), "minItems": 1}, "initContainers": array(CONTAINER),
                   "volumes": array(VOLUME), "nodeSelector": STRING_MAP, "tolerations": array({"type": "object"}),
                   "serviceAccountName": {"type": "string"}}, ("containers",)),
})
SERVICE = open_({"metadata": {"type": "object"}, "spec": {"type": "object"}})

HEAD_GROUP = closed({"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
                     "headService": SERVICE, "enableIngress": {"type": "boolean"},
                     "rayStartParams": STRING_MAP, "template": POD_TEMPLATE},
                    ("rayStartParams", "template"))
WORKER_GROUP = closed({"groupName": {"type": "string"}, "replicas": INT32, "minReplicas": INT32, "maxReplicas": INT32,
                       "numOfHosts": INT32, "idleTimeoutSeconds": INT32, "suspend": {"type": "boolean"},
                       "rayStartParams": STRING_MAP, "template": POD_TEMPLATE,
                       "scaleStrategy": closed({"workersToDelete": array({"type": "string"})})},
                      ("groupName", "rayStartParams", "template"))
AUTOSCALER = closed({"resources": RESOURCES, "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
                     "env": array(ENV_VAR), "envFrom": array({"type": "object"}),
                     "volumeMounts": array({"type": "object"}), "securityContext": {"type": "object"},
                     "idleTimeoutSeconds": INT32, "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                     "version": {"enum": ["v1", "v2"]}})
RAY_CLUSTER_SPEC = closed({"headGroupSpec": HEAD_GROUP, "workerGroupSpecs": array(WORKER_GROUP),
                           "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
                           "autoscalerOptions": AUTOSCALER, "headServiceAnnotations": STRING_MAP,
                           "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
                           "gcsFaultToleranceOptions": {"type": "object"}},
                          ("headGroupSpec",))
RAY_JOB_SPEC = closed({
    "activeDeadlineSeconds": INT32, "backoffLimit": INT32, "rayClusterSpec": RAY_CLUSTER_SPEC,
    "submitterPodTemplate": POD_TEMPLATE, "metadata": STRING_MAP, "clusterSelector": STRING_MAP,
    "submitterConfig": closed({"backoffLimit": INT32}), "managedBy": {"type": "string"},
    "deletionStrategy": {"type": "object"}, "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
    "jobId": {"type": "string"}, "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
    "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
    "entrypointNumGpus": {"type": "number"}, "ttlSecondsAfterFinished": INT32,
    "shutdownAfterJobFinishes": {"type": "boolean"}, "suspend": {"type": "boolean"}, "schedule": {"type": "string"}})
RAY_SERVICE_SPEC = closed({"serveConfigV2": {"type": "string"}, "rayClusterConfig": RAY_CLUSTER_SPEC,
                           "serveService": SERVICE, "upgradeStrategy": {"type": "object"},
                           "excludeHeadPodFromServeSvc": {"type": "boolean"}},
                          ("rayClusterConfig",))


def resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return closed({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                   "metadata": open_({"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                      "labels": STRING_MAP, "annotations": STRING_MAP}, ("name",)),
                   "spec": spec}, ("apiVersion", "kind", "metadata", "spec"))


SCHEMAS = {"RayCluster": resource("RayCluster", RAY_CLUSTER_SPEC), "RayJob": resource("RayJob", RAY_JOB_SPEC),
           "RayService": resource("RayService", RAY_SERVICE_SPEC)}
