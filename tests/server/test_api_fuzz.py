"""Property-based fuzzing of the HTTP API from its own OpenAPI schema: no input causes a 5xx.

Every operation is fuzzed with schema-valid inputs (which must succeed or be refused
cleanly) and schema-violating ones (which must be refused with a 4xx).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

# Enough examples per operation and mode to reach wrong types, out-of-range values
# and odd strings in every field, while the module stays under a minute on 2 cores.
MAX_EXAMPLES = 50
MAX_FUZZ_STEPS = 3


def shorten_denoising(body):
    # Step counts are range-checked by dedicated tests; a valid request here should
    # finish fast so the budget goes to inputs rather than to denoising.
    steps = body.get("num_inference_steps") if isinstance(body, dict) else None
    if isinstance(steps, int) and not isinstance(steps, bool) and steps > MAX_FUZZ_STEPS:
        body["num_inference_steps"] = MAX_FUZZ_STEPS


def completed_requests(server) -> float:
    value = server.state.metrics.registry.get_sample_value("glideserve_requests_total", {"status": "completed"})
    return value or 0.0


@pytest.fixture(scope="module")
def operations(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_schema_lists_the_image_api(operations):
    labels = {operation.label for operation in operations}
    assert "POST /v1/images/generations" in labels
    assert "DELETE /v1/requests/{request_id}" in labels


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_makes_the_server_fail(server, operations, mode):
    completed_before = completed_requests(server)
    for operation in operations:
        takes_input = any(len(getattr(operation, part)) for part in ("body", "path_parameters", "headers", "query"))
        if mode is GenerationMode.NEGATIVE and not takes_input:
            continue  # nothing to violate

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            shorten_denoising(case.body)
            case.call_and_validate(base_url=server.url, checks=[not_a_server_error], timeout=120)

        check()
    if mode is GenerationMode.POSITIVE:
        assert completed_requests(server) > completed_before, "no schema-valid request produced an image"
