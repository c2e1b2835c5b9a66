"""What the decode workers' fork server imports for workers that send requests
(connectors.oneroster.forkserver), so that each worker forked from it starts with it: the
request sender (with http.client), what httpx loads only at its first client and request
(its transport, the IDNA codec: a worker sends through httpx when a proxy is set), and
httpx's default TLS context, which both verify with, built once here instead of in each
worker.
Each of them was a worker's first request's delay, while the fetch waited for it."""

from __future__ import annotations

import encodings.idna  # noqa: F401

import httpcore  # noqa: F401

from connectors.oneroster import direct

direct.share_default_tls()
