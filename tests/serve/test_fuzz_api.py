"""The OpenAPI schema fuzzed with schemathesis against a live server of small limits: no 5xx."""

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")

from aiayn.serve.app import create_app  # noqa: E402
from aiayn.serve.models import Limits, Models  # noqa: E402
from tests.serve.conftest import serving  # noqa: E402

SMALL = Limits(max_chars=200, max_texts=4, max_new_tokens=8, max_beam=2, timeout_s=30)


# the schema of the routes (no models needed to write it); the cases go to a live server with models
schema = schemathesis.openapi.from_dict(create_app(Models(None, None), warmup=False).openapi())


@pytest.fixture(scope="module")
def small_server(shipped_models):
    with serving(create_app(shipped_models, SMALL)) as url:
        yield url


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_a_server_error(case, small_server):
    response = case.call(base_url=small_server, timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code >= 400:
        assert "error" in response.json()
