"""``pre_start``: request a URL once the core is ready, so that its app boots before visitors come.

As Passenger's ``pre_start``, the request goes through the front door users use (the web server,
when a module started the core), so that the web server's configuration names the app. A web
server may start listening a moment after the core is ready: connection failures are retried for
a while. One task per URL, cancelled when the core stops.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from urllib.parse import urlsplit

log = logging.getLogger("appmanager")

RETRY_FOR = 30.0
RETRY_EVERY = 0.5
ANSWER_TIMEOUT = 120.0


async def pre_start(url: str, stopping: asyncio.Event) -> None:
    """GET ``url`` (retrying while nothing listens there yet) and log the answer's status."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    context: ssl.SSLContext | None = None
    if https:
        # The point is to boot the app, not to check the certificate (often self-signed here).
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RETRY_FOR
    while not stopping.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port, ssl=context)
        except OSError as exc:
            if loop.time() > deadline:
                log.warning("pre_start %s: cannot connect: %s", url, exc.strerror or exc)
                return
            await asyncio.sleep(RETRY_EVERY)
            continue
        try:
            netloc = parts.netloc.rsplit("@", 1)[-1]
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: appmanager pre_start\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
            )
            line = await asyncio.wait_for(reader.readline(), ANSWER_TIMEOUT)
            status = line.split(b" ", 2)[1].decode("ascii", "replace") if line else "no answer"
            log.info("pre_start %s: %s", url, status)
        except (OSError, TimeoutError, IndexError) as exc:
            log.warning("pre_start %s: %s", url, exc)
        finally:
            writer.close()
        return
