"""Request work, the server's limits and the `serve` flags that set them (no server)."""

from __future__ import annotations

import pytest

from vllm_layered.cli import build_parser
from vllm_layered.model_executor.image_processing import MAX_ASPECT_RATIO, bucket_size
from vllm_layered.model_executor.pipeline import MAX_LAYERS
from vllm_layered.serving.limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_REQUEST_WORK,
    DEFAULT_REQUEST_TIMEOUT_S,
    ServerLimits,
    request_work,
)
from vllm_layered.serving.protocol import APIError


def widest_bucket(resolution: int) -> tuple[int, int]:
    """The bucket with the most patches over every aspect ratio W:1000 up to 16:1 (W x H and H x W have the
    same number of patches)."""
    buckets = (bucket_size(width, 1000, resolution) for width in range(1000, 1000 * MAX_ASPECT_RATIO + 1))
    return max(buckets, key=lambda b: (b[0] // 16) * (b[1] // 16))


def test_request_work_counts_image_token_forwards():
    # 4 layers at 640 square: 6 frames of 40 x 40 patches, two forwards per CFG step
    assert request_work(layers=4, bucket=(640, 640), num_inference_steps=50, cfg=True, n=1) == 6 * 1600 * 2 * 50
    assert request_work(layers=4, bucket=(640, 640), num_inference_steps=50, cfg=False, n=3) == 6 * 1600 * 50 * 3
    assert request_work(layers=1, bucket=(736, 544), num_inference_steps=1, cfg=False, n=1) == 3 * 46 * 34


def test_the_default_work_cap_admits_the_largest_trained_request_and_not_twice_it():
    width, height = widest_bucket(1024)
    assert (width // 16) * (height // 16) == 4320  # more than 64 x 64: rounding to 32 px grows some buckets
    largest = request_work(layers=MAX_LAYERS, bucket=(width, height), num_inference_steps=50, cfg=True, n=1)
    assert largest == 9_504_000 <= DEFAULT_MAX_REQUEST_WORK < 2 * largest
    assert request_work(layers=4, bucket=(640, 640), num_inference_steps=1000, cfg=True, n=1) > DEFAULT_MAX_REQUEST_WORK


def test_check_work_uses_the_tenant_cap_in_place_of_the_server_one():
    limits = ServerLimits(max_request_work=100)
    limits.check_work(100, "acme", None)
    limits.check_work(500, "acme", 500)  # a tenant may be allowed more than the server default
    with pytest.raises(APIError) as refused:
        limits.check_work(101, "acme", None)
    assert refused.value.status_code == 400 and refused.value.code == "work_limit_exceeded"
    assert "101 image token-forwards" in refused.value.message and "over the limit of 100" in refused.value.message
    with pytest.raises(APIError, match="tenant 'acme''s limit of 50"):
        limits.check_work(51, "acme", 50)
    ServerLimits(max_request_work=None).check_work(10**12, "acme", None)


@pytest.mark.parametrize("field", ["request_timeout_s", "body_timeout_s", "max_request_work"])
@pytest.mark.parametrize("value", [0, -1, float("nan")])
def test_limits_must_be_positive_or_none(field, value):
    with pytest.raises(ValueError, match=field):
        ServerLimits(**{field: value})


def test_serve_flags_default_and_turn_off():
    parse = build_parser().parse_args
    args = parse(["serve"])
    assert (args.request_timeout, args.body_timeout, args.max_request_work) == (
        DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_REQUEST_WORK,
    )
    for off in ("0", "none", "None"):
        args = parse(["serve", "--request-timeout", off, "--body-timeout", off, "--max-request-work", off])
        assert (args.request_timeout, args.body_timeout, args.max_request_work) == (None, None, None)
    args = parse(["serve", "--request-timeout", "90.5", "--max-request-work", "123"])
    assert (args.request_timeout, args.max_request_work) == (90.5, 123)
    for bad in (["--body-timeout", "-1"], ["--max-request-work", "1.5"], ["--request-timeout", "soon"]):
        with pytest.raises(SystemExit):
            parse(["serve", *bad])
