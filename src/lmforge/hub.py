"""Models named by Hugging Face Hub id, wherever lmforge takes a model or tokenizer.

    resolve("runs/quickstart/model")        a directory: itself
    resolve("gpt2")                         a Hub id: the cached snapshot of the files lmforge reads
    resolve("Qwen/Qwen2.5-0.5B@v1.0")       ... at a revision (branch, tag or commit)

Downloads go through huggingface_hub (its cache: HF_HOME / HF_HUB_CACHE; HF_TOKEN for
gated repositories; its progress bars), only the files lmforge needs: configs, the
tokenizer, and the weights as safetensors (`*.bin` only when a repository has no
safetensors). With HF_HUB_OFFLINE=1 the cache alone answers. Every failure is one line
naming the id (not found, gated without a token, not cached while offline).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json"]
SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
PICKLES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", *TOKENIZER_FILES]

# org/name or a legacy single name (gpt2, bert-base-uncased), optionally @revision
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*(?:@[\w./-]+)?$")


class HubError(ValueError):
    """A Hub id that cannot be resolved; the message names it and says why in one line."""


def is_hub_id(name: str) -> bool:
    """Could `name` (not an existing path) be a Hub id? ("org/name", "name", with @revision)"""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~")) and not name.endswith((".json", "/"))


def resolve(name: str | os.PathLike, *, revision: str | None = None,
            files: list[str] | None = None) -> Path:
    """A local directory for a model (or tokenizer, adapter) named by path or Hub id.

    An existing path is returned as it is. Otherwise `name` must be a Hub id ("org/name",
    optionally "@revision"; `revision` overrides that) and the snapshot of `files` (glob
    patterns; default: configs, tokenizer and weights) comes from huggingface_hub's cache,
    downloading what is missing unless HF_HUB_OFFLINE is set."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not is_hub_id(text):
        raise FileNotFoundError(f"{text}: no such directory (and not a Hugging Face Hub id)")
    repo_id, _, at = text.partition("@")
    revision = revision or at or None
    if files is not None:
        return _download(repo_id, revision, files)
    folder = _download(repo_id, revision, CONFIG_FILES + TOKENIZER_FILES + SAFETENSORS)
    if not any(folder.glob("*.safetensors")):
        folder = _download(repo_id, revision, CONFIG_FILES + TOKENIZER_FILES + PICKLES)
    return folder


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """huggingface_hub.snapshot_download of the files matching `patterns`, its errors as HubError lines."""
    import huggingface_hub
    from huggingface_hub import errors

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except errors.GatedRepoError:
        raise HubError(f"{where}: a gated repository: accept its terms on the Hub, then set HF_TOKEN "
                       "(or `huggingface-cli login`)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"{where}: no such revision on the Hugging Face Hub") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"{where}: no such model on the Hugging Face Hub (or it is private: set HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError:
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        raise HubError(f"{where}: not in the local Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
                       f"and {why}; download it once with a network, or give a local directory") from None
    except errors.HfHubHTTPError as e:
        raise HubError(f"{where}: the Hugging Face Hub answered {e}") from None


def lay_out(cache: str | os.PathLike, repo_id: str, source: str | os.PathLike, revision: str = "main") -> Path:
    """Put the files of the directory `source` into the Hugging Face cache `cache` as
    huggingface_hub's downloads leave them (models--org--name/: blobs named by content
    hash, a snapshot of relative symlinks per commit, refs/REVISION naming the commit), so
    that `repo_id` resolves offline (HF_HUB_OFFLINE=1) on a machine without a network.
    The commit is a hash of the id and revision, not the Hub's. Returns the snapshot."""
    import hashlib

    root = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    for file in sorted(p for p in Path(source).rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    return root / "snapshots" / commit
