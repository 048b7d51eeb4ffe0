"""Sizing of Ray task requests: whole GPUs, shared GPUs, CPU fallback."""

import pytest
from pydantic import ValidationError

from flows.compute import ComputePlan, gpu_request
from flows.params import CustomizeParams


def test_gpu_request_shares_a_gpu_only_where_the_cluster_has_one() -> None:
    assert gpu_request(1.0, cluster_gpus=4) == 1.0
    assert gpu_request(0.5, cluster_gpus=1) == 0.5  # two subjects per GPU
    assert gpu_request(0.25, cluster_gpus=0) == 0.0  # no GPU: the task runs on CPU
    assert gpu_request(2.0, cluster_gpus=1) == 0.0  # never a request that waits forever
    with pytest.raises(ValueError, match=">= 0"):
        gpu_request(-1.0, cluster_gpus=1)


def test_a_shared_gpu_plan_asks_ray_for_the_fraction() -> None:
    plan = ComputePlan("ray", gpus_per_task=0.5, cluster_gpus=1.0)
    assert plan.remote_options() == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert plan.device == "cuda"
    assert ComputePlan("ray").remote_options() == {"num_cpus": 1.0}
    assert ComputePlan("ray").device == "cpu"
    assert ComputePlan("local").remote_options() == {}


def test_gpus_per_subject_is_validated_and_does_not_change_the_run_id() -> None:
    assert CustomizeParams(gpus_per_subject=0.5).derived_run_id() == \
        CustomizeParams().derived_run_id()
    with pytest.raises(ValidationError, match="gpus_per_subject"):
        CustomizeParams(gpus_per_subject=0)
