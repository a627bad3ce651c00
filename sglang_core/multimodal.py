"""Images in prompts: what a model plugin's input processor provides, and how the request side
turns a prompt's image placeholders and images into ``MediaItem``s.

A vision-language model plugin registers its model with an ``input_processor`` (see
``hookspecs.register_models``): an ``InputProcessor`` subclass, built on the request side as
``cls(model_folder, config)``. For each image it gives the encoder's input tensors and the number
of placeholder tokens the image takes, exactly as the checkpoint's Hugging Face processor expands
its image token. A prompt holds the image token once per image; ``expand_prompt`` repeats each
to its image's length. The engine core later runs the model's ``embed_media`` on the items and
splices the embeddings over the placeholders (``ForwardBatch.input_embeds``).
"""

from __future__ import annotations

import abc
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from sglang_core.messages import MediaItem, TensorData

if TYPE_CHECKING:
    from PIL import Image


class InputProcessor(abc.ABC):
    """A model's preprocessing of images, on the request side (never the scheduler's thread).
    Its ``process_*`` methods are called from several threads at once: no shared mutable state."""

    image_token: str  # the placeholder text that stands for one image in a prompt
    image_token_id: int

    @abc.abstractmethod
    def __init__(self, model_folder: Path, config: Any): ...

    @abc.abstractmethod
    def process_image(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
        """The encoder's inputs for one image (``{"pixel_values": [1, 3, H, W], ...}``) and how
        many placeholder tokens it takes in the prompt."""

    def media_positions(self, ids: list[int], media: list[MediaItem]) -> tuple[torch.Tensor, int] | None:
        """For a model whose positions depend on the media (M-RoPE): the expanded prompt's positions
        [components, len(ids)] and the decode delta (``MediaPositions``). None: token indices."""
        return None

    # A model that takes videos names their placeholder and implements ``process_video``.
    video_token: str | None = None
    video_token_id: int | None = None

    def process_video(self, frames: list[Image.Image]) -> tuple[dict[str, torch.Tensor], int]:
        """The encoder's inputs for one video, given as its sampled frames, and how many
        placeholder tokens it takes in the prompt. Frames decoded from a file carry the rate they
        sample it at (``media_loading.VideoFrames.fps``)."""
        raise ValueError("video: the model takes no videos")


def pack_tensor(tensor: torch.Tensor) -> TensorData:
    tensor = tensor.detach().cpu().contiguous()
    return TensorData(str(tensor.dtype).removeprefix("torch."), list(tensor.shape), tensor.numpy().tobytes())


def unpack_tensor(data: TensorData, device: torch.device | str = "cpu") -> torch.Tensor:
    dtype = getattr(torch, data.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"media: unknown tensor dtype {data.dtype!r}")
    flat = torch.frombuffer(bytearray(data.data), dtype=dtype) if data.data else torch.empty(0, dtype=dtype)
    return flat.reshape(data.shape).to(device)


def content_digest(tensors: dict[str, torch.Tensor]) -> bytes:
    """A hash of an image's preprocessed tensors (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.digest()


def placeholder_key(digest: bytes) -> int:
    """The id the prefix cache keys an image's placeholder tokens by: negative, so it never equals
    a real token id, and derived from the content, so the same image matches and another does not."""
    return -1 - (int.from_bytes(digest[:8], "little") >> 1)


def expand_prompt(processor: InputProcessor, ids: list[int], images: list[Image.Image],
                  field: str = "image_data", videos: Sequence[list[Image.Image]] = ()) -> tuple[list[int], list[MediaItem]]:
    """``ids`` with each image (video) token repeated to its image's (video's) placeholder count,
    and the items, in prompt order. The prompt must hold the image token exactly once per image
    and the video token once per video (each a list of frames)."""
    slots = media_slots(processor, ids, images, videos, field)
    out: list[int] = []
    items: list[MediaItem] = []
    start = 0
    for slot, (kind, media) in sorted(slots, key=lambda s: s[0]):
        tensors, length = processor.process_image(media) if kind == "image" else processor.process_video(media)
        out += ids[start:slot]
        items.append(MediaItem(offset=len(out), length=length, digest=content_digest(tensors),
                               tensors={name: pack_tensor(t) for name, t in tensors.items()}))
        out += [ids[slot]] * length
        start = slot + 1
    return out + ids[start:], items


def media_slots(processor: InputProcessor, ids: list[int], images: Sequence[Any], videos: Sequence[Any] = (),
                field: str = "image_data") -> list[tuple[int, tuple[str, Any]]]:
    """Each image's and video's place in ``ids`` (its token's index), paired with it; a
    ``ValueError`` naming ``field`` unless the prompt holds each token once per item of its kind."""
    slots = _slots(ids, processor.image_token_id, images, processor.image_token, "image", field)
    if videos or processor.video_token_id is not None:
        slots += _slots(ids, processor.video_token_id, videos, processor.video_token, "video", field)
    return slots


def _slots(ids: list[int], token_id: int | None, media: Sequence[Any], token: str | None, kind: str,
           field: str) -> list[tuple[int, tuple[str, Any]]]:
    slots = [i for i, t in enumerate(ids) if t == token_id] if token_id is not None else []
    if len(slots) != len(media):
        raise ValueError(f"{field}: {len(media)} {kind}(s) given but the prompt holds the {kind} token "
                         f"{token!r} {len(slots)} time(s)")
    return [(slot, (kind, item)) for slot, item in zip(slots, media)]


def expanded_position(position: int, media: list[MediaItem]) -> int:
    """Where position ``position`` of a prompt as given (one image token per image) lies once
    ``expand_prompt`` has expanded it into ``media``."""
    shift = 0
    for item in media:
        if item.offset - shift >= position:  # the image token was at item.offset - shift
            break
        shift += item.length - 1
    return position + shift


def media_key_ids(ids: list[int], media: list[MediaItem]) -> list[int]:
    """``ids`` as the prefix cache keys them: each image's placeholders replaced by its ``placeholder_key``."""
    key = list(ids)
    for item in media:
        key[item.offset : item.offset + item.length] = [placeholder_key(item.digest)] * item.length
    return key
