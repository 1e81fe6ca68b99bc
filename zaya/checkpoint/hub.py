"""Where a checkpoint is: a local directory, or a hub repo id fetched into the local cache."""

from __future__ import annotations

import os
import re
from pathlib import Path

from zaya.errors import CheckpointError

DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def resolve(model: str | os.PathLike) -> Path:
    """A local directory, a ``.gguf`` file, or a hub repo id fetched (with a progress bar) into the
    local cache. A directory without config.json that holds exactly one ``.gguf`` file means that file."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path if (path / "config.json").is_file() else _single_gguf(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return path
        raise CheckpointError(f"{path} is a file; pass a .gguf file or the directory that holds config.json and "
                              "*.safetensors")
    name = str(model)
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", name):
        raise CheckpointError(f"no model directory at {path} (and {name!r} is not a hub repo id like 'Zyphra/ZAYA1-8B')")
    path = download(name)
    return path if (path / "config.json").is_file() else _single_gguf(path)  # a repo of GGUF files, pulled


def _single_gguf(path: Path) -> Path:
    files = sorted(path.glob("*.gguf"))
    if len(files) == 1:
        return files[0]
    if files:
        raise CheckpointError(f"{path} holds several GGUF files ({', '.join(f.name for f in files)}); pass one of them")
    return path  # the loader says what is missing


def download(repo_id: str, revision: str | None = None) -> Path:
    # huggingface_hub is imported here, not at start-up: most runs load a local directory
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:  # a model pulled earlier needs no network
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(f"cannot download {repo_id}: the hub is unreachable (offline?) and it is not in the "
                              f"local cache. Pass a local directory instead, or `zaya pull {repo_id}` when online."
                              ) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"cannot download {repo_id}: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot download {repo_id}: {exc}") from exc
