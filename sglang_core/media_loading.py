"""Reading a request's images safely: data URLs and base64 always; files only under an allowed
folder; http(s) URLs only when switched on, only from public addresses (resolved once, checked, and
that address connected to), without redirects, within a byte limit and one deadline for the whole
fetch. Decoded with Pillow, in the common web formats only, after a check of the pixel count
(decompression bombs) and of the aspect ratio (a processor that resizes the short side blows a thin
image up). Videos come from the same sources, or as a list of frames (each an image); a video file is decoded with
PyAV (the ``video`` extra) after a frame-size check, its frames sampled evenly, within a frame limit.
Every refusal is a ``ValueError`` naming the field (HTTP 400)."""

from __future__ import annotations

import base64
import binascii
import functools
import io
import ipaddress
import os
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    import httpcore
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
# Pillow's decoders for those: none of its rarer ones (a larger attack surface; EPS runs Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")
# Networks whose IPv6 addresses reach an IPv4 address held in their last 32 bits (NAT64; the
# deprecated IPv4-compatible form).
IPV4_IN_IPV6 = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96"))


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int
    max_pixels: int
    local_dir: Path | None = None  # None: no file paths
    allow_urls: bool = False
    fetch_timeout_s: float = 10.0
    video_frames: int = 8  # frames sampled from a video file
    max_video_frames: int = 32  # the most a video may have (given as frames) or a request may ask to sample
    # The longest side over the shortest: Qwen2-VL's processors refuse more; CLIP's, resizing the
    # short side to 336, would make a 1x100000 image 3.4 billion pixels.
    max_aspect_ratio: float = 200.0


class VideoFrames(list):
    """A video's sampled frames (images), and the rate they sample it at in frames per second
    (``fps``; None where unknown, as for a video given as frames): a model may place its frames in time."""

    def __init__(self, frames: list[Image.Image], fps: float | None = None):
        super().__init__(frames)
        self.fps = fps


def load_image(source: str | bytes, limits: MediaLimits, field: str = "image_data") -> Image.Image:
    """An image from raw bytes, a ``data:`` URL, base64 text, a file path or an http(s) URL."""
    data = read_source(source, limits, field)
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        check_size(image.width, image.height, limits.max_pixels, limits.max_aspect_ratio, field, "image")
        image.load()
    except ValueError:
        raise
    except UnidentifiedImageError:
        raise ValueError(f"{field}: cannot decode the image: not one of the formats {', '.join(IMAGE_FORMATS)}") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{field}: cannot decode the image: {exc}") from None
    return image


def check_size(width: int, height: int, max_pixels: int, max_aspect_ratio: float, field: str, what: str) -> None:
    """Refuse an image or a video frame over the pixel limit or the aspect ratio limit."""
    if width * height > max_pixels:
        raise ValueError(f"{field}: the {what} has {width}x{height} pixels, more than the limit of {max_pixels}")
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise ValueError(f"{field}: the {what} is {width}x{height} pixels, its sides more than "
                         f"{max_aspect_ratio:g} times apart")


def load_video(source: str | bytes | list, limits: MediaLimits, field: str = "video",
               num_frames: int | None = None) -> list[Image.Image]:
    """A video's frames: a list of images (each a source ``load_image`` takes) as they are, or
    ``num_frames`` (default ``limits.video_frames``) sampled evenly from a video file's frames."""
    if isinstance(source, list):
        if not source:
            raise ValueError(f"{field}: a video needs at least one frame")
        if len(source) > limits.max_video_frames:
            raise ValueError(f"{field}: the video has {len(source)} frames, more than the limit of "
                             f"{limits.max_video_frames}")
        return [load_image(frame, limits, f"{field}.{i}") for i, frame in enumerate(source)]
    wanted = limits.video_frames if num_frames is None else num_frames
    if not isinstance(wanted, int) or isinstance(wanted, bool) or not 1 <= wanted <= limits.max_video_frames:
        raise ValueError(f"{field}: num_frames must be an int from 1 to {limits.max_video_frames}, got {wanted!r}")
    return decode_video(read_source(source, limits, field), wanted, limits.max_pixels, field, limits.max_aspect_ratio)


def decode_video(data: bytes, num_frames: int, max_pixels: int, field: str = "video",
                 max_aspect_ratio: float = MediaLimits.max_aspect_ratio) -> VideoFrames:
    """``num_frames`` frames sampled evenly from a video file's bytes (each within ``max_pixels``
    and ``max_aspect_ratio``)."""
    try:
        import av
    except ImportError:
        raise ValueError(f"{field}: decoding video files needs PyAV (pip install 'sglang-core[video]'); "
                         "or give the video as a list of frames") from None
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ValueError(f"{field}: the file has no video stream")
            stream = container.streams.video[0]
            check_size(stream.codec_context.width, stream.codec_context.height, max_pixels, max_aspect_ratio, field,
                       "video's frames")
            # The packets give the frame count without decoding (the header's count may be absent).
            total = sum(1 for packet in container.demux(stream) if packet.size)
            rate = stream.average_rate
        if total == 0:
            raise ValueError(f"{field}: the video has no frames")
        keep = _even_indices(total, num_frames)
        frames = []
        with av.open(io.BytesIO(data), mode="r") as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index in keep:
                    frames.append(frame.to_image())
                if len(frames) == len(keep):
                    break
    except (av.FFmpegError, OSError) as exc:  # before ValueError: PyAV's errors are ValueErrors too
        raise ValueError(f"{field}: cannot decode the video: {exc}") from None
    if not frames:
        raise ValueError(f"{field}: no frame of the video could be decoded")
    return VideoFrames(frames, float(rate) * len(keep) / total if rate else None)


def _even_indices(total: int, count: int) -> set[int]:
    """``count`` frame indices spread evenly from the first frame to the last (all, if fewer)."""
    if count >= total:
        return set(range(total))
    if count == 1:
        return {0}
    return {round(i * (total - 1) / (count - 1)) for i in range(count)}


def read_source(source: str | bytes, limits: MediaLimits, field: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return _bounded(bytes(source), limits, field)
    if not isinstance(source, str) or not source:
        raise ValueError(f"{field}: expected a URL, a data URL, base64 text or a file path")
    if source.startswith("data:"):
        header, comma, payload = source.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError(f"{field}: a data URL must be 'data:<type>;base64,<data>'")
        return _base64(payload, limits, field)
    if source[:8].lower().startswith(("http://", "https://")):  # URL schemes are case-insensitive
        return _fetch(source, limits, field)
    if source.startswith("file://") or source.lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES):
        return _read_file(source.removeprefix("file://"), limits, field)
    return _base64(source, limits, field)


def _bounded(data: bytes, limits: MediaLimits, field: str) -> bytes:
    if len(data) > limits.max_bytes:
        raise ValueError(f"{field}: the file is larger than {limits.max_bytes} bytes")
    return data


def _base64(text: str, limits: MediaLimits, field: str) -> bytes:
    if len(text) * 3 // 4 > limits.max_bytes:  # before decoding: the limit bounds the work too
        raise ValueError(f"{field}: the file is larger than {limits.max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: not a URL, a data URL, a file path or valid base64") from None


def _read_file(path: str, limits: MediaLimits, field: str) -> bytes:
    if limits.local_dir is None:
        raise ValueError(f"{field}: media file paths are not allowed (the server reads them only under "
                         "--allowed-local-media-path)")
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_relative_to(limits.local_dir.resolve()):
        raise ValueError(f"{field}: {path!r} is outside the allowed media folder")
    if not resolved.is_file():
        raise ValueError(f"{field}: no such file {path!r}")
    if resolved.stat().st_size > limits.max_bytes:
        raise ValueError(f"{field}: the file is larger than {limits.max_bytes} bytes")
    return resolved.read_bytes()


def _fetch(url: str, limits: MediaLimits, field: str) -> bytes:
    if not limits.allow_urls:
        raise ValueError(f"{field}: media URLs are not fetched (start the server with --allow-media-urls); "
                         "send a data URL instead")
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"{field}: the URL has no host")
    if parts.username is not None:
        raise ValueError(f"{field}: the URL must not carry credentials")
    try:  # httpcore takes ASCII alone: an internationalized host in its IDNA form
        host, port = parts.hostname.encode("idna").decode("ascii"), parts.port
    except ValueError as exc:  # UnicodeError included
        raise ValueError(f"{field}: the URL's host or port is not valid: {exc}") from None
    # The path's and query's other characters percent-encoded (those already so kept as they are).
    target = quote(parts.path or "/", safe="/%!$&'()*+,;=:@~") + (
        "?" + quote(parts.query, safe="/?%!$&'()*+,;=:@~") if parts.query else "")
    import httpcore

    from sglang_core.deadline_network import DeadlineBackend

    # One deadline for the whole fetch, DNS answer, connection, headers and body: a timeout per
    # wait would let a server that sends a byte now and then hold the fetch for ever.
    deadline = time.monotonic() + limits.fetch_timeout_s
    try:
        address = _public_address(host, field, deadline)
        # Connect to the address just checked, naming the host in the Host header (and TLS's SNI, so
        # the certificate is still checked against the host): another DNS answer cannot move the fetch.
        pinned = f"{parts.scheme}://{_netloc(address, port)}{target}"
        # httpcore rather than httpx: its network backend is where every wait meets the deadline.
        # It follows no redirect (a redirect could lead to an address the check above never saw)
        # and uses no proxy from the environment (which would connect where it likes).
        with httpcore.ConnectionPool(ssl_context=_tls_context(os.environ.get("SSL_CERT_FILE"),
                                                              os.environ.get("SSL_CERT_DIR")),
                                     network_backend=DeadlineBackend(deadline)) as pool, \
                pool.stream("GET", pinned, headers={"Host": _netloc(host, port), "User-Agent": "sglang-core",
                                                    "Accept-Encoding": "identity"},
                            extensions={"sni_hostname": host}) as response:
            if response.status != 200:
                raise ValueError(f"{field}: fetching the URL gave HTTP {response.status}")
            return _read_body(response, limits.max_bytes, field)
    except (TimeoutError, httpcore.TimeoutException):
        raise ValueError(f"{field}: fetching the URL took longer than {limits.fetch_timeout_s:g} s") from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        # httpcore wraps the ssl module's error (in its arguments; its pool drops the __cause__).
        for cause in (*exc.args, exc.__context__):
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise ValueError(f"{field}: the server's TLS certificate is not valid for {host!r}: "
                                 f"{cause.verify_message}") from None
            if isinstance(cause, ssl.SSLError):
                raise ValueError(f"{field}: the TLS handshake with the server failed: {cause.reason}") from None
        raise ValueError(f"{field}: fetching the URL failed: {type(exc).__name__}") from None


@functools.lru_cache(maxsize=4)
def _tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """The default TLS context, built once per trust store (loading the system's CAs costs ~20 ms of
    CPU a fetch otherwise). Keyed on OpenSSL's variables since they choose the store it loads; the
    context is only read by the handshakes that share it."""
    return ssl.create_default_context()


def _netloc(host: str, port: int | None) -> str:
    """``host[:port]`` as a URL or a Host header writes it: an IPv6 address in brackets."""
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"


def _read_body(response: httpcore.Response, max_bytes: int, field: str) -> bytes:
    """An httpcore response's body, at most ``max_bytes`` both as sent and as decoded: refused from
    its Content-Length, or as soon as more comes. A server may gzip it though not asked to (a request
    without Accept-Encoding allows any coding; one naming identity alone is not always heeded):
    inflated only up to the limit, so a gzip bomb costs no more than a plain body."""
    too_large = ValueError(f"{field}: the file is larger than {max_bytes} bytes")
    # h11 has checked the Content-Length: digits, one value.
    if any(name.lower() == b"content-length" and int(value) > max_bytes for name, value in response.headers):
        raise too_large
    codings = [coding.strip().lower() for name, value in response.headers if name.lower() == b"content-encoding"
               for coding in value.decode("latin-1").split(",")]
    codings = [coding for coding in codings if coding not in ("", "identity")]
    if codings not in ([], ["gzip"], ["x-gzip"]):
        raise ValueError(f"{field}: the body comes encoded as {', '.join(map(repr, codings))}, which is not decoded")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if codings else None
    chunks, sent, kept = [], 0, 0
    try:
        for chunk in response.iter_stream():
            sent += len(chunk)
            if inflater is not None:  # at most one byte past the limit: enough to know it is passed
                chunk = inflater.decompress(chunk, max_bytes - kept + 1)
            kept += len(chunk)
            if sent > max_bytes or kept > max_bytes:
                raise too_large
            chunks.append(chunk)
    except zlib.error as exc:
        raise ValueError(f"{field}: cannot decode the gzip body: {exc}") from None
    if inflater is not None and not inflater.eof:
        raise ValueError(f"{field}: the gzip body ends early")
    return b"".join(chunks)


def _public_address(host: str, field: str, deadline: float) -> str:
    """An address ``host`` resolves to, after checking that every one is public (none loopback,
    private, link-local or reserved); ``TimeoutError`` if the answer is not in by ``deadline``."""
    answer: list = []
    # The system resolver takes no timeout: it runs on a thread the fetch stops waiting for.
    resolver = threading.Thread(target=_resolve, args=(host, answer), daemon=True)
    resolver.start()
    resolver.join(max(deadline - time.monotonic(), 0))
    if not answer:
        raise TimeoutError
    if isinstance(answer[0], OSError):
        raise ValueError(f"{field}: cannot resolve the URL's host")
    addresses = [info[4][0] for info in answer[0]]
    for address in addresses:
        if not _is_public(ipaddress.ip_address(address.split("%")[0])):
            raise ValueError(f"{field}: the URL's host resolves to a non-public address")
    return addresses[0]


def _resolve(host: str, answer: list) -> None:
    try:
        answer.append(socket.getaddrinfo(host, None))
    except OSError as exc:
        answer.append(exc)


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Global unicast, and so is any IPv4 address an IPv6 one carries to (mapped, 6to4, Teredo, NAT64)."""
    reached = [address]
    if address.version == 6:
        reached += [a for a in (address.ipv4_mapped, address.sixtofour, *(address.teredo or ())) if a is not None]
        if any(address in network for network in IPV4_IN_IPV6):
            reached.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return all(a.is_global and not a.is_multicast for a in reached)
