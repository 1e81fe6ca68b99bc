"""Local models: `zaya pull`, `zaya list`, `zaya rm`, and `find_local` for `--model NAME`.

Models live in huggingface_hub's cache, shared with every other tool that uses the hub:
``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``. A pull fetches
only what zaya loads (config, safetensors, tokenizer and template files; for a repo of GGUF files,
the one ``--quant`` names); the hub shows progress
bars and resumes interrupted downloads from their ``.incomplete`` files, so running the same
``zaya pull`` again continues where it stopped.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from zaya.checkpoint import INDEX_FILE, detect_layout
from zaya.checkpoint.hub import DOWNLOAD_PATTERNS
from zaya.errors import ZayaError


def default_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@dataclass
class LocalModel:
    repo_id: str
    path: Path               # the snapshot directory zaya loads
    revision: str
    size_bytes: int
    layout: str              # native | legacy | incomplete | no weights | not a model
    model_type: str | None


def local_models(cache: Path | None = None) -> list[LocalModel]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = Path(cache or default_cache())
    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = _current_revision(repo)
        out.append(LocalModel(repo.repo_id, Path(rev.snapshot_path), rev.commit_hash, repo.size_on_disk,
                              *_describe(Path(rev.snapshot_path))))
    return sorted(out, key=lambda m: m.repo_id.lower())


def _current_revision(repo):
    """The revision `main` points at, else the most recently modified one."""
    revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
    return next((r for r in revisions if "main" in r.refs), revisions[0])


def _describe(path: Path) -> tuple[str, str | None]:
    if not (path / "config.json").exists() and any(path.glob("*.gguf")):
        return "gguf", "zaya"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "not a model", None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    index = path / INDEX_FILE
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            if any(not (path / f).is_file() for f in set(weight_map.values())):
                return "incomplete", model_type
            return detect_layout(weight_map), model_type
        files = sorted(path.glob("*.safetensors"))
        if not files:
            return "no weights", model_type
        names = []
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                names += list(handle.keys())
        return detect_layout(names), model_type
    except Exception:  # noqa: BLE001 - a half-written file must not break the listing
        return "incomplete", model_type


def find_local(name: str, cache: Path | None = None) -> str | None:
    """The snapshot path of a pulled model: by repo id (any case) or by its name after the '/'
    when that is unambiguous. None when nothing matches."""
    models = local_models(cache)
    exact = [m for m in models if m.repo_id == name] or [m for m in models if m.repo_id.lower() == name.lower()]
    if not exact and "/" not in name:
        exact = [m for m in models if m.repo_id.split("/")[-1].lower() == name.lower()]
    if len(exact) > 1:
        raise ZayaError(f"{name!r} matches several local models: {', '.join(m.repo_id for m in exact)}; "
                        f"use the full repo id")
    return str(exact[0].path) if exact else None


def pick_gguf(files: dict[str, int | None], quant: str | None, repo_id: str) -> list[str]:
    """The GGUF file(s) of a repo (name -> bytes) that ``quant`` (e.g. Q4_K_M) names: one file or
    the parts of a split one. Without ``quant`` a repo must hold a single GGUF."""
    ggufs = sorted(n for n in files if n.endswith(".gguf"))
    listing = ", ".join(f"{n} ({human_size(files[n]) if files[n] else '?'})" for n in ggufs)
    if quant is None:
        if len(ggufs) > 1:
            raise ZayaError(f"{repo_id} holds several GGUF files: {listing}; pick one with --quant (e.g. --quant "
                            f"{_quant_of(ggufs[0]) or 'Q4_K_M'})")
        return ggufs
    word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9])", re.IGNORECASE)
    picked = [n for n in ggufs if word.search(Path(n).name)]
    if not picked:
        raise ZayaError(f"{repo_id} has no GGUF file for {quant!r}; it holds: {listing or 'no GGUF files'}")
    return picked


def _quant_of(name: str) -> str | None:
    m = re.search(r"(?<![A-Za-z0-9])(I?Q\d_[A-Z0-9_]+?|F16|BF16|F32)(?=[.-])", Path(name).name, re.IGNORECASE)
    return m.group(1) if m else None


def _repo_files(repo_id: str, revision: str | None) -> dict[str, int | None]:
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    return {s.rfilename: s.size for s in info.siblings or []}


def pull(repo_id: str, revision: str | None = None, cache: Path | None = None, quant: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        patterns = DOWNLOAD_PATTERNS
        files = _repo_files(repo_id, revision) if quant else None
        if files is not None:
            picked = pick_gguf(files, quant, repo_id)
            total = sum(files[n] or 0 for n in picked)
            print(f"{repo_id}: {', '.join(picked)} ({human_size(total)})", file=sys.stderr)
            patterns = picked + [p for p in DOWNLOAD_PATTERNS if p != "*.safetensors"]
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                 cache_dir=str(cache) if cache else None)
    except LocalEntryNotFoundError as exc:
        raise ZayaError(f"cannot download {repo_id}: the hub is unreachable (offline?)") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ZayaError(f"cannot download {repo_id}: {exc}") from exc
    return Path(path)


def remove(name: str, cache: Path | None = None) -> LocalModel:
    from huggingface_hub import scan_cache_dir

    cache = Path(cache or default_cache())
    path = find_local(name, cache)
    if path is None:
        raise ZayaError(f"no local model {name!r} (see `zaya list`)")
    model = next(m for m in local_models(cache) if str(m.path) == path)
    repo = next(r for r in scan_cache_dir(cache).repos if r.repo_id == model.repo_id and r.repo_type == "model")
    shutil.rmtree(repo.repo_path)  # every revision, its blobs and refs: what the hub's delete does
    return model


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


# ------------------------------------------------------------------------------------ commands
def cmd_pull(args) -> int:
    path = pull(args.repo, args.revision, quant=args.quant)
    layout, _ = _describe(path)
    print(f"{args.repo}: {path} ({layout} layout)")
    return 0


def cmd_list(args) -> int:
    models = local_models()
    if not args.all:
        models = [m for m in models if m.layout != "not a model"]
    if args.json:
        print(json.dumps([{"name": m.repo_id, "path": str(m.path), "revision": m.revision, "size_bytes": m.size_bytes,
                           "layout": m.layout, "model_type": m.model_type} for m in models], indent=2))
        return 0
    print(f"cache: {default_cache()}", file=sys.stderr)
    if not models:
        print("no local models; fetch one with `zaya pull REPO` (e.g. zaya pull Zyphra/ZAYA1-8B)", file=sys.stderr)
        return 0
    width = max(len("NAME"), *(len(m.repo_id) for m in models))
    print(f"{'NAME':<{width}}  {'SIZE':>9}  {'LAYOUT':<11}  {'TYPE':<8}  REVISION")
    for m in models:
        print(f"{m.repo_id:<{width}}  {human_size(m.size_bytes):>9}  {m.layout:<11}  {m.model_type or '-':<8}  "
              f"{m.revision[:12]}")
    return 0


def cmd_rm(args) -> int:
    path = find_local(args.name)
    if path is None:
        raise ZayaError(f"no local model {args.name!r} (see `zaya list`)")
    model = next(m for m in local_models() if str(m.path) == path)
    if not args.yes:
        if not sys.stdin.isatty():
            raise ZayaError("refusing to delete without confirmation; pass --yes")
        answer = input(f"delete {model.repo_id} ({human_size(model.size_bytes)}) from {default_cache()}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return 1
    remove(args.name)
    print(f"deleted {model.repo_id} ({human_size(model.size_bytes)} freed)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("pull", help="download a model into the local cache (resumable)",
                       description="Download a hub repo's config, safetensors and tokenizer into the "
                                   "huggingface_hub cache. Interrupted downloads resume.")
    p.add_argument("repo", help="hub repo id, e.g. Zyphra/ZAYA1-8B")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--quant", default=None, help="for a repo of GGUF files: the one to fetch, e.g. Q4_K_M "
                                                 "(the sizes are shown first)")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="local models with size and layout")
    p.add_argument("--all", action="store_true", help="also list cached repos that are not models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="delete a local model from the cache")
    p.add_argument("name", help="repo id or name from `zaya list`")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_rm)
