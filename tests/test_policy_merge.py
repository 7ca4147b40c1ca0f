"""Policies: the GPU-idle limits (parsed, validated, described like the others) and how an
owner's several groups combine (most generous, or strictest)."""

from __future__ import annotations

import pytest

from jupyter_gpu_sessions.core.errors import InvalidRequest
from jupyter_gpu_sessions.core.policy import Policy, PolicySet
from jupyter_gpu_sessions.manager import GPUSessionManager


def test_gpu_idle_limits_parse_as_a_percent_and_a_duration():
    policy = Policy.parse({"gpu_idle_threshold": "5%", "gpu_idle_window": "30m"})
    assert policy.gpu_idle_threshold == 5.0 and policy.gpu_idle_window == 1800.0
    assert Policy.parse({"gpu_idle_threshold": 0}).gpu_idle_threshold == 0.0
    assert Policy.parse({"gpu_idle_threshold": 2.5}).gpu_idle_threshold == 2.5
    assert Policy.parse({"gpu_idle_threshold": " 100 % "}).gpu_idle_threshold == 100.0
    assert policy.describe("gpu_idle_threshold") == "5%"
    assert policy.to_dict()["gpu_idle_window"] == 1800.0


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ({"gpu_idle_threshold": 101}, ["group:ml.gpu_idle_threshold", "0 to 100"]),
        ({"gpu_idle_threshold": -1}, ["group:ml.gpu_idle_threshold", "0 to 100"]),
        ({"gpu_idle_threshold": "lots"}, ["group:ml.gpu_idle_threshold", "not a percent"]),
        ({"gpu_idle_threshold": "nan"}, ["group:ml.gpu_idle_threshold", "0 to 100"]),
        ({"gpu_idle_threshold": True}, ["group:ml.gpu_idle_threshold"]),
        ({"gpu_idle_window": "soon"}, ["group:ml.gpu_idle_window", "not a duration"]),
        ({"gpu_idle_window": 0}, ["group:ml.gpu_idle_window", "positive"]),
    ],
)
def test_bad_gpu_idle_limits_name_the_scope_and_the_limit(limits, words):
    with pytest.raises(InvalidRequest) as refused:
        PolicySet.from_config({"group:ml": limits})
    for word in words:
        assert word in refused.value.message


GROUPS = {
    "group:ml": {
        "max_gpus": 4,
        "idle_timeout": "1h",
        "gpu_idle_threshold": 5,
        "gpu_idle_window": "1h",
    },
    "group:students": {
        "max_gpus": 1,
        "max_cpus": 8,
        "gpu_idle_threshold": 20,
        "gpu_idle_window": "10m",
    },
    "default": {"max_memory": "16GiB", "max_cpus": 2},
}


def test_the_most_generous_group_limit_wins_by_default():
    policies = PolicySet.from_config(GROUPS)
    policy = policies.for_owner("ada", ["ml", "students"])
    assert policy.max_gpus == 4 and policy.max_cpus == 8 and policy.idle_timeout == 3600
    # A lower idle threshold and a longer window let more kernels keep their GPUs.
    assert policy.gpu_idle_threshold == 5 and policy.gpu_idle_window == 3600
    assert policy.max_memory == 16 * 1024**3  # no group sets it: the default's
    assert policies.source_of("max_gpus", "ada", ["ml", "students"]) == "group:ml"
    assert policies.source_of("gpu_idle_threshold", "ada", ["ml", "students"]) == "group:ml"
    assert policies.source_of("max_cpus", "ada", ["ml", "students"]) == "group:students"


def test_the_strictest_group_limit_wins_when_configured():
    policies = PolicySet.from_config(GROUPS, merge="strictest")
    policy = policies.for_owner("ada", ["ml", "students"])
    assert policy.max_gpus == 1
    assert policy.gpu_idle_threshold == 20 and policy.gpu_idle_window == 600
    # A limit only one group sets is that group's (unset is not "unlimited"), over the
    # default's.
    assert policy.max_cpus == 8 and policy.idle_timeout == 3600
    assert policies.source_of("max_gpus", "ada", ["ml", "students"]) == "group:students"
    assert policies.source_of("gpu_idle_window", "ada", ["ml", "students"]) == "group:students"
    assert policies.source_of("idle_timeout", "ada", ["ml", "students"]) == "group:ml"
    assert policies.source_of("max_memory", "ada", ["ml", "students"]) == "default"
    # The owner's own policy still overrides the groups'.
    own = PolicySet.from_config({**GROUPS, "user:ada": {"max_gpus": 2}}, merge="strictest")
    assert own.for_owner("ada", ["ml", "students"]).max_gpus == 2
    assert own.source_of("max_gpus", "ada", ["ml", "students"]) == "user:ada"


def test_an_unknown_merge_mode_is_refused():
    with pytest.raises(InvalidRequest, match="most-generous or strictest"):
        PolicySet.from_config(GROUPS, merge="loudest")


def test_the_manager_merges_groups_as_configured(tmp_path):
    config = {
        "db_url": f"sqlite:///{tmp_path}/merge.sqlite",
        "policies": GROUPS,
        "groups": {"ml": ["ada"], "students": ["ada"]},
    }
    generous = GPUSessionManager(**config)
    strict = GPUSessionManager(**config, group_policy_merge="strictest")
    try:
        generous.refresh_policies()
        strict.refresh_policies()
        assert generous.policy_for("ada").max_gpus == 4
        assert strict.policy_for("ada").max_gpus == 1
        assert strict.policy_source("ada", "max_gpus") == "group:students"
        strict.group_policy_merge = "most-generous"  # a changed setting applies at once
        assert strict.policy_for("ada").max_gpus == 4
    finally:
        generous.close()
        strict.close()
