"""A recipe's repo files, through the Hugging Face hub's local cache or a local copy, and what identifies weights
without loading them (the feature store's key records it). Every hub failure is one line (`hub_error`)."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from ...records import WeightSource
from ..weights import WeightsError
from .adapters import ADAPTERS
from .recipe import Recipe

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# a repo's weights as timm / transformers name them (sharded ones by their index)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin",
                "model.safetensors.index.json", "pytorch_model.bin.index.json")
CONFIG_SUFFIXES = (".json", ".yaml")


def hub_error(repo: str, e: Exception) -> WeightsError:
    """One clear line for the ways the hub can fail: offline or unreachable, gated, missing."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    page = f"https://huggingface.co/{repo}"
    text = str(e).split("\n")[0]
    if isinstance(e, GatedRepoError) or "gated" in str(e).lower():
        return WeightsError(f"{repo} is gated: accept its licence at {page} while logged in, then set HF_TOKEN "
                            f"(or run `hf auth login`) with that account's token ({text})")
    if isinstance(e, RepositoryNotFoundError):
        return WeightsError(
            f"{repo}: not found on the hub, or gated and no valid token was sent: accept the licence at "
            f"{page} and set HF_TOKEN ({text})"
        )
    if isinstance(e, LocalEntryNotFoundError) or "offline" in str(e).lower() or "connect" in str(e).lower():
        return WeightsError(f"{repo}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be "
                            f"reached (HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}): download it once with "
                            f"`hf download {repo}`, or point model.weights at a local copy (dir:PATH, file:PATH)")
    return WeightsError(f"{repo}: the Hugging Face hub failed: {type(e).__name__}: {text}")


@functools.lru_cache(maxsize=None)
def endpoint_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """One TCP connection to the hub's endpoint, once per process. The hub client retries a refused connection
    with back-off (about 20 s each time, and no setting shortens it); this answers in milliseconds. Behind a proxy
    (HTTP(S)_PROXY, ALL_PROXY) a direct connection proves nothing: the hub client is left to decide."""
    if any(
        os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    ):
        return True
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def hub_file(repo: str, filename: str) -> Path:
    """A file of a hub repo through the local cache (downloaded when online and missing; from the cache alone
    when the hub's endpoint does not answer, as the hub client would after its retries)."""
    from huggingface_hub import constants, hf_hub_download

    local_only = not constants.HF_HUB_OFFLINE and not endpoint_reachable(constants.ENDPOINT)
    try:
        return Path(hf_hub_download(repo, filename, local_files_only=local_only))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one line
        raise hub_error(repo, e) from e


def snapshot_dir(recipe: Recipe) -> Path:
    """The recipe's snapshot folder in the local hub cache (snapshots/<revision>), found through its config file."""
    config = hub_file(recipe.hub_id, recipe.config_file)
    return config.parents[len(Path(recipe.config_file).parts) - 1]


def _snapshot_files(snapshot: Path) -> list[Path]:
    """A snapshot's weight and config files (subfolders included), in name order."""
    return [p for p in sorted(snapshot.rglob("*")) if p.suffix in WEIGHT_SUFFIXES + CONFIG_SUFFIXES and p.is_file()]


def source_identity(recipe: Recipe, weights: WeightSource) -> dict:
    """What identifies the weights without loading them: the hub snapshot's commit, or a local copy's
    files (path, size, modification time). Part of the feature-store key."""
    if weights.kind == "hub":
        snapshot = snapshot_dir(recipe)
        return {"hub": recipe.hub_id, "revision": snapshot.name}
    if weights.kind == "none":
        return {"random_init": True}
    path = weights.path.resolve()
    if not path.exists():
        raise WeightsError(f"model.weights: {path} does not exist")
    return local_identity(path)


def snapshot_files(recipe: Recipe, record=None) -> dict:
    """The content identity of a hub snapshot's weight and config files as they are in the local cache now: per
    file its blob name (the hub cache names blobs by their content hash) and size, and for config files a hash of
    their text. No times: a copied cache (a Kaggle dataset is one) has other times and the same content. The
    feature store records it when it is embedded and compares it when reused (`same_file`): a file replaced or
    edited in the cache under the same revision is caught; an edit in place of a blob by `check_blob`. `record`
    (verified.Record): a plain file's bytes are hashed only when a stat says they may have changed."""
    snapshot = snapshot_dir(recipe)
    out = {}
    for p in _snapshot_files(snapshot):
        real = p.resolve()
        entry = {"blob": real.name if p.is_symlink() else None, "size": real.stat().st_size}
        if p.suffix in CONFIG_SUFFIXES or not p.is_symlink():  # a file that is no blob: its bytes are its identity
            entry["sha256"] = _sha256(real) if record is None else record.digest(real, _sha256, "sha256")
        out[p.relative_to(snapshot).as_posix()] = entry
    return out


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def same_file(recorded, now: dict | None) -> bool:
    """Whether a snapshot file is the one a store recorded. Stores of earlier versions recorded
    [blob, size, mtime(, text hash)]: their blob and size (and text hash) are compared, not the time."""
    if now is None:
        return False
    if isinstance(recorded, list):
        blob, size, text = recorded[0], recorded[1], recorded[3] if len(recorded) > 3 else None
        if blob is None:  # a plain file, recorded by its time then: its bytes were never recorded
            return False
        return blob == now["blob"] and size == now["size"] and (text is None or text == now.get("sha256", "")[:16])
    return recorded == now


def check_blob(recipe: Recipe, name: str, record=None) -> None:
    """A snapshot file whose blob is named by its SHA-256 (the hub cache's large files) must hash to its name:
    one that does not was edited in place - tampering, not an update (an update is another blob). With a
    `record` (verified.Record), a blob is hashed only when a stat says it may have changed since it was last found
    whole (4.5 GB for H-optimus-0: once, not at every open)."""
    import re

    path = snapshot_dir(recipe) / name
    blob = path.resolve()
    if not re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return  # small files are named by their git hash (SHA-1 of a header + content): their text is compared
    digest = _sha256(blob) if record is None else record.digest(blob, _sha256, "sha256")
    if digest != blob.name:
        raise WeightsError(f"{path}: its blob {blob} does not match its content hash (edited in place in the Hugging "
                           f"Face cache); restore it with `hf download {recipe.hub_id} --force-download`")


def local_identity(path: Path) -> dict:
    """A weights file, or a folder's weight and config files (subfolders included: MedImageInsight keeps
    them in 2024.09.27/...): path, and each file's relative name, size, mtime."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES + CONFIG_SUFFIXES)
    else:
        files = [path]
    root = path if path.is_dir() else path.parent
    return {"path": str(path), "files": [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
                                         for p in files]}


def repo_path(recipe: Recipe, weights: WeightSource, name: str) -> Path:
    """A file of the recipe's repo: through the hub cache (`hub`) or inside a local copy (`dir:PATH`)."""
    if weights.kind == "hub":
        return hub_file(recipe.hub_id, name)
    path = weights.path / name
    if not path.is_file():
        raise WeightsError(f"model.weights={weights}: no {name} there (expected a copy of the hub repo "
                           f"{recipe.hub_id} in its own layout)")
    return path


def repo_config(recipe: Recipe, weights: WeightSource) -> dict:
    """The repo's architecture file (config.json, or what the recipe's adapter reads, e.g. MedImageInsight's
    config.yaml) from the hub cache or a local folder; {} for a bare weights file or random init."""
    if weights.kind not in ("hub", "dir"):
        return {}
    path = repo_path(recipe, weights, recipe.config_file)
    if recipe.adapter:
        return ADAPTERS[recipe.adapter].read_config(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot be read as the repo's config ({type(e).__name__}: {e})") from None


def from_the_hub(e: Exception) -> bool:
    """An error of the hub client or the network (not of building the model from the downloaded files)."""
    module = type(e).__module__.split(".")[0]
    return isinstance(e, (ConnectionError, TimeoutError)) or module in (
        "huggingface_hub",
        "httpx",
        "requests",
        "urllib3",
    )


def preprocessor_config(recipe: Recipe, weights: WeightSource) -> dict:
    """A transformers repo's preprocessor_config.json where it is at hand (cache or folder), else {}."""
    if weights.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(recipe.hub_id, "preprocessor_config.json")
        path = Path(path) if isinstance(path, str) else None
    elif weights.kind == "dir":
        path = weights.path / "preprocessor_config.json"
    else:
        path = None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def local_weights_file(recipe: Recipe, weights: WeightSource) -> Path | None:
    """The weights file a hub snapshot (in the local cache) or a local copy holds, by timm's and transformers'
    names; None when none is at hand (the loader then downloads, or says what is missing)."""
    if weights.kind == "dir":
        return next((weights.path / n for n in WEIGHT_FILES if (weights.path / n).is_file()), None)
    if weights.kind != "hub":
        return None
    from huggingface_hub import try_to_load_from_cache

    for name in WEIGHT_FILES:
        found = try_to_load_from_cache(recipe.hub_id, name)
        if isinstance(found, str):
            return Path(found)
    return None
