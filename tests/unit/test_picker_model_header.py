"""The picker's HTTP endpoint reads the model a request names from x-paddler-model (Envoy's filter sets it)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.unit.test_management import BUFFER_TIMEOUT, TOKEN, Api, Fleet, serve


@pytest.fixture
async def client() -> AsyncIterator[Api]:
    runner, base = await serve(Fleet(), TOKEN)
    async with aiohttp.ClientSession() as session:
        yield Api(base, session)
    await runner.cleanup()


@pytest.mark.parametrize("model", ["", "../etc", "a b", "x" * 129, "-leading-dash"])
async def test_a_model_header_that_is_no_model_name_is_refused(client: Api, model: str) -> None:
    status, text = await client.picker("/api/v1/picker/acquire", **{"x-paddler-model": model})
    assert status == 400 and "x-paddler-model is not a model name" in text


async def test_a_named_model_is_placed_only_where_it_is_served(client: Api) -> None:
    # No backend of this fleet serves "alpha": the request waits in alpha's queue until its timeout (0.2 s).
    assert await client.picker("/api/v1/picker/acquire", **{"x-paddler-model": "alpha"}) == (503, BUFFER_TIMEOUT)
    status, text = await client.picker("/api/v1/picker/acquire")
    assert status == 200 and json.loads(text)["backend"] == "gpu1"
