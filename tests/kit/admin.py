"""Talking to an admin listener in tests: JSON views, actions, and /metrics read
back into samples (with prometheus-client's parser, as a scraper would)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tunnelgate.admin.server import AdminServer

# (name, its labels written out sorted "k=v,k=v") -> value
Metrics = dict[tuple[str, str], float]


def labels(**values: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(values.items()))


async def get_json(http: aiohttp.ClientSession, url: str, status: int = 200) -> Any:
    async with http.get(url) as response:
        assert response.status == status, await response.text()
        return await response.json()


async def post(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    """(status, JSON answer) of a POST; a JSON body ``{}`` unless told otherwise."""
    kwargs.setdefault("json", {})
    async with http.post(url, **kwargs) as response:
        return response.status, await response.json()


async def scrape(http: aiohttp.ClientSession, server: AdminServer) -> Metrics:
    """Every sample of /metrics."""
    async with http.get(server.url + "metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, labels(**sample.labels)): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def wait_async(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 10) -> Any:
    """Poll an async check (of a server, over HTTP) until it returns something true;
    that value. Fail after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not (value := await check()):  # noqa: ASYNC110 (polling a server over HTTP)
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None
    return value


async def wait_metrics(
    http: aiohttp.ClientSession,
    server: AdminServer,
    check: Callable[[Metrics], bool],
    what: str,
    timeout: float = 10,
) -> Metrics:
    """Scrape until ``check`` holds; the metrics that passed."""

    async def passed() -> Metrics | None:
        metrics = await scrape(http, server)
        return metrics if check(metrics) else None

    result: Metrics = await wait_async(passed, what, timeout)
    return result
