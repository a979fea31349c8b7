"""Models named by Hugging Face hub id ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B@main"): found
in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE) through huggingface_hub, and
downloaded when the network is allowed (HF_HUB_OFFLINE unset).  Only the files a model
directory needs are fetched: config, safetensors, tokenizer (never pickles or code)."""
from __future__ import annotations

import json
import os
import re

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "added_tokens.json", "chat_template.jinja", "chat_template.json"]


def split_revision(name: str) -> tuple:
    """"owner/name@rev" -> ("owner/name", "rev"); no "@" -> (name, None)."""
    repo, sep, rev = name.partition("@")
    return (repo, rev) if sep and rev else (name, None)


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID.match(split_revision(name)[0]))


def _where(repo_id: str, revision: str | None) -> str:
    return repo_id + (f"@{revision}" if revision else "")


def resolve_hub_model(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot directory of `repo_id` at `revision` (default: main), from the cache
    or downloaded.  OSError naming the repo, the cache directory and what is missing when it
    cannot be had."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    what = _where(repo_id, revision)
    cache = constants.HF_HUB_CACHE
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=MODEL_FILES,
                                 local_files_only=bool(constants.HF_HUB_OFFLINE))
    except LocalEntryNotFoundError:
        how = ("downloading is off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
               else "the hub could not be reached")
        raise OSError(f"{what}: not a local path, and this model is not in the Hugging Face cache {cache} "
                      f"({how}); fetch it where the network allows with `hf download {repo_id}"
                      f"{' --revision ' + revision if revision else ''}` (same HF_HOME), or pass a local "
                      "model directory") from None
    except GatedRepoError:
        raise OSError(f"{what}: the repo is gated; accept its terms on huggingface.co and log in "
                      "(`hf auth login`)") from None
    except RevisionNotFoundError:
        raise OSError(f"{what}: the repo has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise OSError(f"{repo_id}: no such model repo on the Hugging Face hub (or it is private: "
                      "`hf auth login`)") from None
    except HfHubHTTPError as e:
        raise OSError(f"{what}: download failed: {' '.join(str(e).split())}") from None
    missing = missing_files(path)
    if missing:
        raise OSError(f"{what}: the cached snapshot {path} lacks {', '.join(missing)}"
                      + ("" if constants.HF_HUB_OFFLINE else " (the repo has no safetensors model?)")
                      + f"; complete it with `hf download {repo_id}` (same HF_HOME)")
    return path


def missing_files(d: str) -> list:
    """Files a model directory needs that `d` lacks: config.json, and model.safetensors or
    the index and every shard it names."""
    missing = [] if os.path.isfile(os.path.join(d, "config.json")) else ["config.json"]
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        except (ValueError, AttributeError):
            return missing  # the loader names what is wrong with the index
        missing += [s for s in shards if not os.path.isfile(os.path.join(d, s))]
    elif not os.path.isfile(os.path.join(d, "model.safetensors")):
        missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
    return missing
