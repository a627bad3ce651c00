"""Images and video frames for ``sgl.image`` / ``sgl.video``: loaded into :class:`Image` (bytes +
MIME type) only when the program runs, on a backend that takes images; a video file as it is
(:class:`Video`) for a backend whose server decodes videos."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from sglang_core.lang.backend import Image, Video

# Leading bytes of the image formats chat APIs accept.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
               (b"GIF89a", "image/gif"))


def sniff_mime(data: bytes) -> str | None:
    """The MIME type of image bytes by their signature, or None if not a known image format."""
    for signature, mime in _SIGNATURES:
        if data.startswith(signature):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def load_image(source: str | bytes) -> Image:
    """An image from raw bytes, an ``http(s)://`` URL or a file path."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif source.startswith(("http://", "https://")):
        import httpx

        response = httpx.get(source, follow_redirects=True, timeout=30)
        response.raise_for_status()
        data = response.content
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"image: no such file {source!r}")
        data = path.read_bytes()
    mime = sniff_mime(data)
    if mime is None and isinstance(source, str):
        guessed = mimetypes.guess_type(source)[0]
        mime = guessed if guessed and guessed.startswith("image/") else None
    if mime is None:
        raise ValueError("image: not a PNG, JPEG, GIF or WebP image")
    return Image(data, mime)


def load_video(path: str, num_frames: int) -> Video:
    """A video file's bytes, for the server to sample ``num_frames`` frames of."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"video: no such file {path!r}")
    return Video(file.read_bytes(), mimetypes.guess_type(path)[0] or "application/octet-stream", num_frames)


def load_video_frames(path: str, num_frames: int) -> list[Image]:
    """``num_frames`` frames spread evenly over the video, as PNG images. Needs PyAV
    (``pip install 'sglang-core[video]'``); without it, a ``ValueError`` saying so."""
    import io

    from sglang_core.media_loading import decode_video

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"video: no such file {path!r}")
    frames = []
    for frame in decode_video(file.read_bytes(), num_frames, max_pixels=2**31):  # the program's own file
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG")
        frames.append(Image(buffer.getvalue(), "image/png"))
    return frames
