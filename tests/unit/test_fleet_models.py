"""fleet.schema's model keys: which models a fleet routes, each model's limits, and the errors for each mistake."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet import FleetError, parse_fleet, validate_model_name
from fleet.schema import MAX_MODELS

SOURCE = "fleet.yaml"


def fleet(**top: Any) -> dict[str, Any]:
    return {"backends": [{"name": "gpu1", "address": "10.0.0.1:8080"}], **top}


def test_a_fleet_without_model_keys_routes_as_one_model() -> None:
    parsed = parse_fleet(fleet(), SOURCE)
    assert parsed.model_names() == ()
    assert not parsed.routes_by_model()
    assert parsed.request_default_model() is None


def test_model_names_come_from_limits_backends_and_the_default_in_file_order() -> None:
    parsed = parse_fleet({
        "backends": [{"name": "gpu1", "address": "10.0.0.1:8080", "models": ["beta", "alpha"]},
                     {"name": "gpu2", "address": "10.0.0.2:8080", "models": ["gamma"]}],
        "standby": [{"name": "cpu1", "address": "10.0.0.3:8080", "models": ["delta", "alpha"]}],
        "models": {"qwen3-8b": {"max_buffered_requests": 50, "buffered_request_timeout": "20s"}},
        "default_model": "Org.Model:Q4_K_M",
    }, SOURCE)
    assert parsed.model_names() == ("qwen3-8b", "beta", "alpha", "gamma", "delta", "Org.Model:Q4_K_M")
    assert parsed.backends[0].models == ("beta", "alpha")
    assert parsed.request_default_model() == "Org.Model:Q4_K_M"
    assert parsed.limits("qwen3-8b") == (50, 20.0)
    assert parsed.limits("beta") == (parsed.balancer.max_buffered_requests, parsed.balancer.buffered_request_timeout)


def test_one_model_is_the_default_for_requests_that_name_none() -> None:
    parsed = parse_fleet(fleet(models={"alpha": None}), SOURCE)
    assert parsed.model_names() == ("alpha",)
    assert parsed.request_default_model() == "alpha"
    assert parsed.limits("alpha") == (30, 10.0)


def test_several_models_and_no_default_leave_unnamed_requests_without_one() -> None:
    parsed = parse_fleet(fleet(models={"alpha": {}, "beta": {"max_buffered_requests": 5}}), SOURCE)
    assert parsed.request_default_model() is None
    assert parsed.limits("beta") == (5, 10.0)


@pytest.mark.parametrize(("top", "key", "problem"), [
    ({"models": ["alpha"]}, "models", "expected a mapping of model name to limits, got a list"),
    ({"models": {"al pha": {}}}, "models.al pha", "not allowed as a model name"),
    ({"models": {"alpha": {"max_buffered_requests": 0}}}, "models.alpha.max_buffered_requests", "must be 1-100000"),
    ({"models": {"alpha": {"slots": 2}}}, "models.alpha.slots", "unknown key"),
    ({"models": {"alpha": "fast"}}, "models.alpha", "expected a mapping"),
    ({"default_model": "x\ny"}, "default_model", "not allowed as a model name"),
    ({"default_model": 7}, "default_model", "expected a model name, got 7"),
    ({"backends": [{"name": "gpu1", "address": "10.0.0.1:8080", "models": []}]}, "backends[0].models",
     "expected a list of at least one model name"),
    ({"backends": [{"name": "gpu1", "address": "10.0.0.1:8080", "models": "alpha"}]}, "backends[0].models",
     "expected a list"),
    ({"backends": [{"name": "gpu1", "address": "10.0.0.1:8080", "models": ["a", "b", "a"]}]},
     "backends[0].models", "lists a model twice: ['a']"),
    ({"backends": [{"name": "gpu1", "address": "10.0.0.1:8080", "models": ["llama/3"]}]}, "backends[0].models",
     "'llama/3' is not allowed as a model name"),
])
def test_each_mistake_names_its_key(top: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(FleetError) as raised:
        parse_fleet(fleet(**top), SOURCE)
    assert raised.value.key == key
    assert problem in raised.value.problem


def test_the_number_of_models_is_bounded() -> None:
    many = {f"m{index}": {} for index in range(MAX_MODELS + 1)}
    with pytest.raises(FleetError, match=f"at most {MAX_MODELS} models in a fleet"):
        parse_fleet(fleet(models=many), SOURCE)


@given(st.text(max_size=140))
def test_accepted_model_names_cannot_break_a_config_line_or_a_haproxy_name(text: str) -> None:
    try:
        name = validate_model_name(text)
    except ValueError:
        return
    assert name.isascii() and name.isprintable()
    assert not set(name) & set(" \t\r\n#,'\"\\/{}%$[]")
