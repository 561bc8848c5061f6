"""The core's request reader: heads, bodies, and the requests it must refuse."""

from __future__ import annotations

import pytest

from appmanager.request import INLINE_LIMIT, MAX_HEAD, HttpError, RequestReader


def read_all(data: bytes, step: int | None = None) -> tuple[RequestReader, int]:
    """Feed ``data`` (in pieces of ``step`` bytes when given) until the request is complete."""
    reader = RequestReader(None)
    buf = bytearray()
    used_total = 0
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        buf += piece
        used = reader.feed(buf)
        del buf[:used]
        used_total += used
        if reader.complete:
            break
    return reader, used_total


def test_simple_get() -> None:
    reader, used = read_all(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\nGET /next")
    assert reader.complete
    req = reader.finish()
    assert req.method == b"GET"
    assert req.path == b"/a?b=c"
    assert req.host == b"x"
    assert req.keep_alive and req.http11
    assert used == len(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize(
    ("head", "keep"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nConnection: upgrade, close\r\n\r\n", False),
    ],
)
def test_keep_alive_rules(head: bytes, keep: bool) -> None:
    reader, _ = read_all(head)
    assert reader.finish().keep_alive is keep


@pytest.mark.parametrize("step", [None, 1, 7])
def test_content_length_body_in_pieces(step: int | None) -> None:
    data = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello worldEXTRA"
    reader, used = read_all(data, step)
    req = reader.finish()
    assert req.body == b"hello world" and req.body_len == 11
    assert used == len(data) - len(b"EXTRA")


@pytest.mark.parametrize("step", [None, 1, 5])
def test_chunked_body_is_dechunked(step: int | None) -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\nNEXT"
    )
    reader, used = read_all(data, step)
    req = reader.finish()
    assert req.body == b"hello world"
    assert used == len(data) - 4


def test_large_body_spools_to_a_file() -> None:
    body = b"x" * (INLINE_LIMIT * 3 + 17)
    data = b"PUT / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    reader, _ = read_all(data, 40000)
    req = reader.finish()
    assert req.body == b"" and req.body_file is not None and req.body_len == len(body)
    req.body_file.seek(0)
    assert req.body_file.read() == body
    req.discard()


def test_expect_continue() -> None:
    reader = RequestReader(None)
    buf = bytearray(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    del buf[: reader.feed(buf)]
    assert not reader.complete and reader.send_continue


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nExpect: magic\r\nContent-Length: 1\r\n\r\n", 417),
    ],
)
def test_refused(raw: bytes, status: int) -> None:
    with pytest.raises(HttpError) as info:
        read_all(raw)
    assert info.value.status == status


def test_incomplete_head_waits_for_more() -> None:
    reader = RequestReader(None)
    buf = bytearray(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert reader.feed(buf) == 0 and reader.request is None
