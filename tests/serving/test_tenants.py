"""Tenant registry, key hashing and admission limits (no server)."""

from __future__ import annotations

import json

import pytest

from vllm_layered.serving.tenants import (
    AdmissionControl,
    AdmissionError,
    AuthenticationError,
    Tenant,
    TenantRegistry,
    TokenBucket,
    hash_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write_keys(tmp_path, tenants) -> str:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": tenants}))
    return str(path)


def test_keys_file_maps_hashed_keys_to_tenants(tmp_path):
    registry = TenantRegistry.from_file(write_keys(tmp_path, [
        {"name": "a", "api_key_sha256": [hash_key("key-a1"), hash_key("key-a2").upper()], "weight": 3},
        {"name": "b", "api_key_sha256": hash_key("key-b"), "priority": 2, "max_request_work": 5000},
    ]))
    assert registry.authenticate("Bearer key-a1").name == "a"
    assert registry.authenticate("bearer key-a2").name == "a"
    assert registry.authenticate("Bearer key-b").priority == 2
    assert registry.tenants["b"].max_request_work == 5000 and registry.tenants["a"].max_request_work is None
    assert registry.weights() == {"a": 3, "b": 1.0}
    for header in (None, "", "Bearer", "Bearer nope", "Basic key-a1", "key-a1"):
        with pytest.raises(AuthenticationError):
            registry.authenticate(header)


def test_open_mode_admits_everyone_as_default():
    registry = TenantRegistry.open()
    assert registry.authenticate(None).name == "default" == registry.authenticate("Bearer x").name


@pytest.mark.parametrize(
    ("tenants", "match"),
    [
        ([], "non-empty"),
        ([{"name": "a", "api_key_sha256": ["abc"]}], "SHA-256"),
        ([{"name": "a", "api_key": "plain"}], "unknown tenant fields"),
        ([{"name": "a", "max_concurrency": 0}], "max_concurrency"),
        ([{"name": "a", "requests_per_minute": -1}], "requests_per_minute"),
        ([{"name": "a", "weight": 0}], "weight"),
        ([{"name": "a", "max_request_work": 0}], "max_request_work"),
        ([{"name": "a", "max_request_work": "100"}], "max_request_work"),
        ([{"name": "a"}, {"name": "a"}], "unique"),
        (["a"], "object with a name"),
        ([{"max_concurrency": 1}], "object with a name"),
        ([{"name": "a", "max_concurrency": "2"}], "tenant 'a'"),
        ([{"name": "a", "api_key_sha256": [hash_key("k")]}, {"name": "b", "api_key_sha256": [hash_key("k")]}],
         "another tenant"),
    ],
)
def test_bad_keys_files_are_refused(tmp_path, tenants, match):
    with pytest.raises(ValueError, match=match):
        TenantRegistry.from_file(write_keys(tmp_path, tenants))


def test_token_bucket_refills_at_its_rate():
    clock = Clock()
    bucket = TokenBucket(rate_per_s=0.5, capacity=2, clock=clock)
    assert bucket.take() == 0 and bucket.take() == 0
    assert bucket.take() == pytest.approx(2.0)  # one token takes 2 s at 0.5/s
    clock.now = 1.0
    assert bucket.take() == pytest.approx(1.0)
    clock.now = 2.0
    assert bucket.take() == 0
    clock.now = 100.0  # never more than the capacity
    assert [bucket.take() == 0 for _ in range(3)] == [True, True, False]


def test_admission_enforces_concurrency_then_rate():
    clock = Clock()
    control = AdmissionControl(clock)
    tenant = Tenant("t", max_concurrency=1, requests_per_minute=60, burst=2)
    first = control.admit(tenant)
    with pytest.raises(AdmissionError) as refused:
        control.admit(tenant)
    assert refused.value.reason == "concurrency_limited"
    first.release()
    first.release()  # idempotent
    assert control.in_flight("t") == 0
    control.admit(tenant).release()  # the second token (the refused call took none)
    with pytest.raises(AdmissionError) as refused:
        control.admit(tenant)
    assert refused.value.reason == "rate_limited" and refused.value.retry_after_s == pytest.approx(1.0)
    clock.now = 1.0
    control.admit(tenant).release()
    unlimited = Tenant("u")
    leases = [control.admit(unlimited) for _ in range(100)]
    assert control.in_flight("u") == 100
    for lease in leases:
        lease.release()


def test_admission_follows_changed_limits():
    """A reloaded keys file hands admit() a Tenant with new limits: the bucket keeps what it earned, up to
    the new capacity, and refills at the new rate."""
    clock = Clock()
    control = AdmissionControl(clock)
    control.admit(Tenant("t", requests_per_minute=60, burst=3)).release()  # 2 tokens left
    faster = Tenant("t", requests_per_minute=120, burst=1)
    control.admit(faster).release()  # the capacity is 1 now: one token, not two
    with pytest.raises(AdmissionError) as refused:
        control.admit(faster)
    assert refused.value.retry_after_s == pytest.approx(0.5)  # 2 tokens per second
    clock.now = 0.5
    control.admit(faster).release()
