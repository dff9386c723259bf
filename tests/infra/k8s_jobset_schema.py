"""The JobSet v1alpha2 schema, trimmed for tests/infra/test_k8s.py.

kubernetes-validate bundles only core Kubernetes schemas and just warns on a JobSet. This is the
`spec` schema of the JobSet CRD (kubernetes-sigs/jobset, config/components/crd/bases/
jobset.x-k8s.io_jobsets.yaml at commit 01078527ec43) with every field kept except the Job
template's `spec`, which the test validates as a batch/v1 Job with kubernetes-validate instead.
Unknown fields are rejected, as `kubernetes-validate --strict` does. `onJobFailureReasons` is
narrowed to the Job failure reasons JobSet's webhook accepts.
"""

from __future__ import annotations

from typing import Any

_STR: dict[str, Any] = {"type": "string"}
_INT: dict[str, Any] = {"type": "integer"}
_STRLIST: dict[str, Any] = {"type": "array", "items": _STR}


def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


JOB_FAILURE_REASONS = ["BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes",
                       "MaxFailedIndexesExceeded", "PodFailurePolicy"]

_REPLICATED_JOB = _obj({
    "dependsOn": {"type": "array", "maxItems": 1, "items": _obj(
        {"name": _STR, "status": {"enum": ["Ready", "Complete"]}}, ("name", "status"))},
    "groupName": _STR,
    "name": _STR,
    "replicas": _INT,
    "template": _obj({
        "metadata": _obj({
            "annotations": {"type": "object", "additionalProperties": _STR},
            "finalizers": _STRLIST,
            "labels": {"type": "object", "additionalProperties": _STR},
            "name": _STR,
            "namespace": _STR,
        }),
        # batch/v1 JobSpec: checked with kubernetes-validate as a Job.
        "spec": {"type": "object"},
    }),
}, ("name", "template"))

JOBSET_SPEC: dict[str, Any] = _obj({
    "coordinator": _obj({"jobIndex": _INT, "podIndex": _INT, "replicatedJob": _STR},
                        ("replicatedJob",)),
    "failurePolicy": _obj({
        "maxRestarts": _INT,
        "restartStrategy": {"enum": ["Recreate", "BlockingRecreate"]},
        "rules": {"type": "array", "items": _obj({
            "action": {"enum": ["FailJobSet", "RestartJobSet",
                                "RestartJobSetAndIgnoreMaxRestarts"]},
            "name": {"type": "string", "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
            "onJobFailureReasons": {"type": "array",
                                    "items": {"enum": JOB_FAILURE_REASONS}},
            "targetReplicatedJobs": _STRLIST,
        }, ("action", "name"))},
    }),
    "managedBy": _STR,
    "network": _obj({"enableDNSHostnames": {"type": "boolean"},
                     "publishNotReadyAddresses": {"type": "boolean"}, "subdomain": _STR}),
    "replicatedJobs": {"type": "array", "items": _REPLICATED_JOB},
    "startupPolicy": _obj({"startupPolicyOrder": {"enum": ["AnyOrder", "InOrder"]}},
                          ("startupPolicyOrder",)),
    "successPolicy": _obj({"operator": {"enum": ["All", "Any"]},
                           "targetReplicatedJobs": _STRLIST}, ("operator",)),
    "suspend": {"type": "boolean"},
    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
})

JOBSET: dict[str, Any] = _obj({
    "apiVersion": {"const": "jobset.x-k8s.io/v1alpha2"},
    "kind": {"const": "JobSet"},
    "metadata": {"type": "object"},
    "spec": JOBSET_SPEC,
}, ("apiVersion", "kind", "metadata", "spec"))
