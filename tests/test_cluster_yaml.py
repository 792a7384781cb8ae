"""cluster.yaml and its on-prem variant validate against Ray's own cluster schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["cluster.yaml", "docs/cluster-onprem.yaml"])
def test_cluster_config_matches_ray_schema(path):
    config = yaml.safe_load((REPO / path).read_text())
    validate_config(prepare_config(config))  # what `ray up` does: fill defaults, then validate
    text = (REPO / path).read_text()
    assert "--dashboard-host=127.0.0.1" in text  # the dashboard is not exposed
    assert "ray[default,train,tune,data]==" in text  # same Ray, with the Jobs server, everywhere
    assert "RAY_AUTH_MODE=token" in text and "auth_token" in text


def test_schema_check_catches_mistakes():
    import jsonschema

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
