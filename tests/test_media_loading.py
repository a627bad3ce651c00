"""Reading request images safely (``sglang_core.media_loading``): every source form, and every
refusal a 400-style ``ValueError`` naming the field: files outside the allowed folder, URLs when
off, non-public hosts, redirects, too many bytes (gzip bodies inflated included) or pixels, HTTPS
certificates not valid for the host, what is not an image."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import itertools
import socket
import ssl
import threading
import time
import typing
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


@pytest.mark.parametrize("netloc", ["images.example:99999", "images.example:port", "images..example"])
def test_urls_with_bad_hosts_or_ports_are_refused(netloc: str):
    with pytest.raises(ValueError, match="^image_data: the URL's host or port is not valid"):
        load_image(f"http://{netloc}/cat.png", MediaLimits(100_000, 10_000, allow_urls=True))


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
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)  # polls shutdown every 50 ms
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


HTTPS_HOST = "images.example.test"
IDN_HOST, IDN_HOST_ASCII = "bücher.example.test", "xn--bcher-kva.example.test"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A CA, and a certificate it signs for ``HTTPS_HOST`` and ``IDN_HOST`` (their names in the subject
    alternative names), as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, host_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                 encipher_only=False, decipher_only=False)
    ca = certificate("test CA", ca_key, "test CA", ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=False, key_cert_sign=True, crl_sign=True, **usage), True)])
    host = certificate(HTTPS_HOST, host_key, "test CA", ca_key, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectAlternativeName([x509.DNSName(HTTPS_HOST), x509.DNSName(IDN_HOST_ASCII)]), False)])
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "host.pem").write_bytes(host.public_bytes(serialization.Encoding.PEM) + host_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder


@pytest.fixture(scope="module")
def https_server(tls_files):
    """An HTTPS server for ``HTTPS_HOST``'s certificate on 127.0.0.1, recording each request's TLS
    server name (SNI), Host and Accept-Encoding headers and path in ``.seen``; its paths send an
    image plainly, gzipped, chunked, or too much of it."""
    import gzip
    from http.server import ThreadingHTTPServer

    png = _png()
    bomb = gzip.compress(bytes(20_000_000))  # 20 MB of zeros in 20 kB
    seen: list[tuple[str | None, str, str, str]] = []
    tls_names: dict[int, str | None] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            seen.append((tls_names.get(id(self.connection)), self.headers["Host"], self.headers["Accept-Encoding"],
                         self.path))
            path = self.path.partition("?")[0]
            gzipped = ("Content-Encoding", "gzip")
            if path == "/cat.png":
                self._send(png)
            elif path == "/gzip.png":
                self._send(gzip.compress(png), gzipped)
            elif path == "/gzip-cut.png":
                self._send(gzip.compress(png)[:-20], gzipped)
            elif path == "/gzip-bomb.png":
                self._send(bomb, gzipped)
            elif path == "/brotli.png":
                self._send(png, ("Content-Encoding", "br"))
            elif path == "/huge-length.png":  # says 1 GB, sends a little, then waits
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n" + png)
                self.wfile.flush()
                time.sleep(1.5)
            elif path == "/chunked.png":
                self._send_chunked(png[start:start + 100] for start in range(0, len(png), 100))
            elif path == "/endless.png":  # until the client leaves
                self._send_chunked(itertools.repeat(bytes(1000)))
            elif path == "/gzip-endless.png":  # a gzip header, then empty deflate blocks (a sync flush's) for ever
                self._send_chunked(itertools.chain([gzip.compress(b"")[:10]], itertools.repeat(b"\0\0\0\xff\xff" * 200)),
                                   gzipped)
            self.close_connection = True

        def _send(self, body: bytes, *headers: tuple[str, str]):
            self.send_response(200)
            for name, value in (("Content-Length", str(len(body))), *headers):
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _send_chunked(self, parts: typing.Iterable[bytes], *headers: tuple[str, str]):
            self.send_response(200)
            for name, value in (("Transfer-Encoding", "chunked"), *headers):
                self.send_header(name, value)
            self.end_headers()
            with contextlib.suppress(OSError):  # the client left
                for part in parts:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args):
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files / "host.pem")
    context.sni_callback = lambda connection, name, _: tls_names.__setitem__(id(connection), name)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.seen = seen
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)  # polls shutdown every 50 ms
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture
def trusting_the_test_ca(monkeypatch, tls_files):
    """Every host "resolved" (and passed) as 127.0.0.1, as above, and the test CA the only one
    trusted: OpenSSL reads ``SSL_CERT_FILE`` for the default trust store at each
    ``ssl.create_default_context()``, so the fetch's own TLS set-up runs unchanged."""
    monkeypatch.setattr(media_loading, "_public_address", lambda host, field, deadline: "127.0.0.1")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files / "ca.pem"))


def _https_limits(fetch_timeout_s: float = 3.0) -> MediaLimits:
    return MediaLimits(max_bytes=100_000, max_pixels=10_000, allow_urls=True, fetch_timeout_s=fetch_timeout_s)


@pytest.mark.parametrize("host, ascii_host", [(HTTPS_HOST, HTTPS_HOST), (IDN_HOST, IDN_HOST_ASCII)])
def test_https_fetch_names_the_host_in_sni_and_the_host_header(https_server, trusting_the_test_ca, host: str,
                                                               ascii_host: str):
    """Connected to the checked address, the fetch still names the URL's host (an internationalized
    one in its IDNA form): in TLS's server name (so the certificate is checked against it) and in
    the Host header, port included; it asks for the body as it is (no gzip); the query's other
    characters percent-encoded."""
    port = https_server.server_address[1]
    https_server.seen.clear()
    assert load_image(f"https://{host}:{port}/cat.png?name=kätzchen 1&x=%C3%A4", _https_limits()).size == (8, 6)
    assert https_server.seen == [(ascii_host, f"{ascii_host}:{port}", "identity",
                                  "/cat.png?name=k%C3%A4tzchen%201&x=%C3%A4")]


def test_https_certificates_not_valid_for_the_host_are_refused(https_server, trusting_the_test_ca, monkeypatch):
    port = https_server.server_address[1]
    with pytest.raises(ValueError, match="^image_data.1: the server's TLS certificate is not valid for "
                                         "'other.example.test': Hostname mismatch"):
        load_image(f"https://other.example.test:{port}/cat.png", _https_limits(), "image_data.1")
    monkeypatch.delenv("SSL_CERT_FILE")  # the system's CAs: none signed the test's certificate
    with pytest.raises(ValueError, match="^image_data.1: the server's TLS certificate is not valid for "
                                         f"'{HTTPS_HOST}': unable to get local issuer certificate"):
        load_image(f"https://{HTTPS_HOST}:{port}/cat.png", _https_limits(), "image_data.1")


def test_https_to_a_server_without_tls_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(media_loading, "_public_address", lambda host, field, deadline: "127.0.0.1")
    with _image_server(_png()) as url, pytest.raises(
            ValueError, match="^image_data: the TLS handshake with the server failed: WRONG_VERSION_NUMBER"):
        load_image(url.replace("http:", "https:") + "/cat.png", _https_limits())


def test_a_stalled_tls_handshake_ends_at_the_deadline(trusting_the_test_ca):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nothing answers the ClientHello
        started = time.monotonic()
        with pytest.raises(ValueError, match="took longer than 0.3 s"):
            load_image(f"https://{HTTPS_HOST}:{silent.getsockname()[1]}/cat.png", _https_limits(0.3))
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("path, why", [
    ("cat.png", None), ("chunked.png", None),
    # gzip was not asked for (Accept-Encoding: identity), yet a server may send it: decoded, its
    # decoded bytes within the byte limit
    ("gzip.png", None), ("gzip-cut.png", "the gzip body ends early"),
    ("gzip-bomb.png", "larger than 100000 bytes"), ("gzip-endless.png", "larger than 100000 bytes"),
    ("brotli.png", "the body comes encoded as 'br', which is not decoded"),
    # refused from the Content-Length (the server then waits 1.5 s), or once the chunks pass the limit
    ("huge-length.png", "larger than 100000 bytes"), ("endless.png", "larger than 100000 bytes"),
])
def test_https_bodies_plain_chunked_or_gzipped_within_the_byte_limit(https_server, trusting_the_test_ca,
                                                                      path: str, why: str | None):
    url = f"https://{HTTPS_HOST}:{https_server.server_address[1]}/{path}"
    started = time.monotonic()
    if why is None:
        assert load_image(url, _https_limits()).size == (8, 6)
    else:
        with pytest.raises(ValueError, match=f"^image_data: .*{why}"):
            load_image(url, _https_limits())
    assert time.monotonic() - started < 1.0


def test_a_gzip_bomb_is_inflated_no_further_than_the_byte_limit(https_server, trusting_the_test_ca):
    """20 MB of zeros in 20 kB of gzip: refused having held about the limit (100 kB), not the 20 MB."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="larger than 100000 bytes"):
            load_image(f"https://{HTTPS_HOST}:{https_server.server_address[1]}/gzip-bomb.png", _https_limits())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000
