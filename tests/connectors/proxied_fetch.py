"""A full fetch through a forward proxy named in the environment, in a process of its own
(the decode workers inherit the environment of their fork server, which starts once per
process): ``python -m tests.connectors.proxied_fetch`` prints, as JSON, how many data
requests the server answered, how many the proxy carried, and how many pages the workers
requested. Used by test_oneroster_direct."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
import urllib.parse
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: What the proxy hands back of an answer (hop-by-hop headers stay behind).
PASSED = ("content-type", "content-encoding", "x-total-count", "link", "retry-after")


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    carried: list[str]


class _Forward(BaseHTTPRequestHandler):
    """A forward proxy for plain HTTP: the request line holds the absolute URL."""

    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        self.server.carried.append(url.path)
        headers = {k: v for k, v in self.headers.items() if not k.lower().startswith("proxy-")}
        upstream = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
        target = url.path + (f"?{url.query}" if url.query else "")
        upstream.request("GET", target, headers=headers)
        answer = upstream.getresponse()
        body = answer.read()
        upstream.close()
        passed = [(k, v) for k, v in answer.getheaders() if k.lower() in PASSED]
        reply(self, answer.status, passed, body)

    def log_message(self, *args: Any) -> None:
        pass


def reply(
    handler: BaseHTTPRequestHandler, status: int, headers: Iterable[tuple[str, str]], body: bytes
) -> None:
    """A whole answer with its length, the connection kept alive."""
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


async def fetch(base: dict[str, Any]) -> dict[str, int]:
    import httpx

    from connectors.oneroster import decode
    from connectors.oneroster.config import OneRosterSourceConfig
    from connectors.oneroster.connector import OneRosterConnector
    from rostersync.source.connector import ConnectorContext, FetchMode

    decode.POOL_MIN_BYTES = decode.POOL_MIN_RECORDS = 0  # every page to the pool
    config = OneRosterSourceConfig.model_validate(base)
    async with httpx.AsyncClient(**config.http_client_options()) as http:
        connector = OneRosterConnector(
            ConnectorContext("district", config, http, own_requests=True)
        )
        try:
            async for _batch in connector.fetch(FetchMode.FULL, None):
                pass
            return {
                "pages_by_workers": connector.pages_by_workers,
                "via_httpx": int(connector._spec().via_httpx),
            }
        finally:
            await connector.aclose()


def main() -> None:
    from tests.connectors.test_oneroster_direct import SPEC
    from tests.e2e.test_oneroster_e2e import aged_district
    from tests.fakes.oneroster_server import FakeOneRoster

    proxy = _ProxyServer(("127.0.0.1", 0), _Forward)
    proxy.carried = []
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    os.environ["HTTP_PROXY"] = f"http://127.0.0.1:{proxy.server_port}"
    for name in ("NO_PROXY", "no_proxy"):
        os.environ.pop(name, None)
    with FakeOneRoster(aged_district(SPEC)) as srv:
        settings = {"page_size": 7, "decode_workers": 2}
        out = asyncio.run(fetch(srv.source_config(**settings)))
        served = len(srv.data_requests())
    proxy.shutdown()
    carried = sum(1 for path in proxy.carried if "/ims/oneroster/" in path)
    print(json.dumps({**out, "served": served, "carried": carried}))


if __name__ == "__main__":
    main()
