"""Reading request images safely (``sglang_core.media_loading``): every source form, and every
refusal a 400-style ``ValueError`` naming the field: files outside the allowed folder, URLs when
off, non-public hosts, redirects, too many bytes or pixels, what is not an image."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from sglang_core import media_loading
from sglang_core.media_loading import MediaLimits, load_image


def _png(width: int = 8, height: int = 6, image_format: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format=image_format)
    return buffer.getvalue()


LIMITS = MediaLimits(max_bytes=100_000, max_pixels=10_000)


def test_data_urls_base64_and_bytes_decode():
    png = _png()
    text = base64.b64encode(png).decode()
    for source in (f"data:image/png;base64,{text}", text, png):
        assert load_image(source, LIMITS).size == (8, 6)


@pytest.mark.parametrize("source, why", [
    ("data:image/png,notbase64", "data:<type>;base64"),
    ("%%%", "valid base64"),
    (base64.b64encode(b"plain text").decode(), "cannot decode the image"),
    (b"\x89PNG\r\n\x1a\n truncated", "cannot decode the image"),
    ("http://example.com/cat.png", "not fetched"),
    ("/etc/hosts.png", "file paths are not allowed"),
    (b"x" * 100_001, "larger than 100000 bytes"),
    ("A" * 140_000, "larger than 100000 bytes"),
    (_png(200, 100), "more than the limit of 10000"),
    # a thin image: CLIP's processor would resize its short side up, the long one with it
    (_png(2010, 4), "2010x4 pixels, its sides more than 200 times apart"),
    (_png(4, 2010), "4x2010 pixels, its sides more than 200 times apart"),
    # formats beyond the common web ones are not decoded (EPS would run Ghostscript)
    (_png(image_format="EPS"), "not one of the formats PNG, JPEG, GIF, WEBP, BMP"),
    (_png(image_format="TIFF"), "not one of the formats"),
    ("HTTP://example.com/cat.png", "not fetched"),  # a URL whatever the case of its scheme
    (123, "expected a URL"),
])
def test_refusals_name_the_field(source, why):
    with pytest.raises(ValueError, match="^image_data.3: ") as err:
        load_image(source, LIMITS, "image_data.3")
    assert why in str(err.value)


def test_files_only_under_the_allowed_folder(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png())
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    limits = MediaLimits(100_000, 10_000, local_dir=allowed)
    assert load_image(str(allowed / "cat.png"), limits).size == (8, 6)
    assert load_image(f"file://{allowed}/cat.png", limits).size == (8, 6)
    for outside in (str(tmp_path / "secret.png"), f"{allowed}/../secret.png", str(allowed / "link.png")):
        with pytest.raises(ValueError, match="outside the allowed media folder"):
            load_image(outside, limits)
    with pytest.raises(ValueError, match="no such file"):
        load_image(str(allowed / "missing.png"), limits)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "[::1]", "192.168.0.1",
                                  "0.0.0.0", "2130706433", "[::ffff:10.1.2.3]",
                                  # IPv6 addresses that reach a private IPv4 one: NAT64, 6to4, IPv4-compatible
                                  "[64:ff9b::a9fe:a9fe]", "[64:ff9b:1::a01:203]", "[2002:a01:203::1]", "[::127.0.0.1]",
                                  "224.0.0.1"])
def test_urls_to_non_public_addresses_are_refused(host):
    limits = MediaLimits(100_000, 10_000, allow_urls=True)
    with pytest.raises(ValueError, match="non-public address"):
        load_image(f"http://{host}/cat.png", limits)


def test_urls_with_credentials_are_refused():
    with pytest.raises(ValueError, match="must not carry credentials"):
        load_image("http://user:pw@example.com/cat.png", MediaLimits(100_000, 10_000, allow_urls=True))


def _drip(out, data: bytes) -> None:
    """Send ``data`` a byte every 50 ms (each far within a timeout of a wait), until the client leaves."""
    with contextlib.suppress(ConnectionError):
        for byte in data:
            out.write(bytes([byte]))
            out.flush()
            time.sleep(0.05)


@contextlib.contextmanager
def _image_server(png: bytes):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if not self.headers["Host"].startswith("images.example:"):  # the URL's host, not the address
                self.send_response(400)
                self.end_headers()
                return
            if self.path == "/moved.png":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.end_headers()
                return
            if self.path == "/slow-headers.png":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                _drip(self.wfile, b"X-Padding: " + b"a" * 60)  # the headers never end in time
                return
            body = png if self.path in ("/cat.png", "/slow.png") else png * 200
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path != "/slow.png":
                self.wfile.write(body)
                return
            _drip(self.wfile, body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://images.example:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_fetch_connects_to_the_checked_address_follows_no_redirect_and_stops_at_the_byte_limit(monkeypatch):
    """A host no DNS knows, "resolved" (and passed) as the local server's address: the fetch goes
    to that address with the host in the Host header."""
    monkeypatch.setattr(media_loading, "_public_address", lambda host, field, deadline: "127.0.0.1")
    png = _png()
    limits = MediaLimits(max_bytes=len(png) * 10, max_pixels=10_000, allow_urls=True, fetch_timeout_s=5)
    with _image_server(png) as url:
        assert load_image(f"{url}/cat.png", limits).size == (8, 6)
        with pytest.raises(ValueError, match="HTTP 302"):
            load_image(f"{url}/moved.png", limits)
        with pytest.raises(ValueError, match="larger than"):
            load_image(f"{url}/big.png", limits)


@pytest.mark.parametrize("path", ["slow.png", "slow-headers.png"])
def test_one_deadline_bounds_the_whole_fetch_headers_included(monkeypatch, path: str):
    """A server that sends its body or its headers a byte at a time, each byte well within the
    timeout, is given up on at the deadline."""
    monkeypatch.setattr(media_loading, "_public_address", lambda host, field, deadline: "127.0.0.1")
    limits = MediaLimits(max_bytes=100_000, max_pixels=10_000, allow_urls=True, fetch_timeout_s=0.3)
    with _image_server(_png()) as url:
        started = time.monotonic()
        with pytest.raises(ValueError, match="took longer than 0.3 s"):
            load_image(f"{url}/{path}", limits)
        assert time.monotonic() - started < 1.0


def test_a_slow_dns_answer_counts_against_the_deadline(monkeypatch):
    """The system resolver has no timeout of its own: the fetch stops waiting for it at the deadline."""
    def slow_getaddrinfo(host, port, *args, **kwargs):
        time.sleep(1.0)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]

    monkeypatch.setattr(media_loading.socket, "getaddrinfo", slow_getaddrinfo)
    started = time.monotonic()
    with pytest.raises(ValueError, match="took longer than 0.2 s"):
        load_image("http://images.example/cat.png", MediaLimits(100_000, 10_000, allow_urls=True, fetch_timeout_s=0.2))
    assert time.monotonic() - started < 0.8
