"""The file behind an open_clip weights tag (``"openai"``, ``"laion2b_s34b_b88k"``), found
before anything is downloaded, so that a machine without network fails in seconds.

open_clip itself asks the Hugging Face Hub for every tag, even one whose weights are cached,
and retries an unreachable Hub for about 50 s before its error. Here the local caches
(Hugging Face's, and ``~/.cache/clip`` for URL tags) are read first; only when the weights are
not there is the network tried, after one quick probe of the host (or none when
``HF_HUB_OFFLINE=1``). An unreachable host raises `WeightsUnavailable` saying how to run
offline.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import fields
from pathlib import Path

PROBE_TIMEOUT_S = 5.0
OFFLINE_HELP = ("To run offline: copy the weights file to this machine and pass it with "
                "--clip-weights FILE (Python: pretrained=FILE; add --quick-gelu for OpenAI "
                "weights), fill the Hugging Face cache (HF_HOME) on a machine with network, or "
                "use --pretrained none (Python: pretrained=None) for random weights, which "
                "only suits tests")


class WeightsUnavailable(ConnectionError):
    """The weights of a tag are not cached here and cannot be downloaded."""


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why `url`'s host cannot be reached (None when it answers at all, any HTTP status);
    one request, proxies from the environment honoured."""
    request = urllib.request.Request(url, method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:  # it answered
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return " ".join(str(reason).split()) or type(exc).__name__
    return None


def tag_config(name: str, tag: str) -> dict:
    from open_clip.pretrained import get_pretrained_cfg

    return get_pretrained_cfg(name, tag)


def preprocess_fields(cfg: dict) -> dict:
    """The tag's image preprocessing (mean, std, ...), as open_clip applies it for a tag."""
    from open_clip.transform import PreprocessCfg

    return {f.name: cfg[f.name] for f in fields(PreprocessCfg) if f.name in cfg}


def _hub_files(hub: str) -> tuple[str, list[str]]:
    """(repo id, file names to look for, safetensors first) of an ``org/repo/[file]`` entry."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    names = [filename]
    if filename == HF_WEIGHTS_NAME:
        names.insert(0, HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    return repo, names


def _cached_hub_file(repo: str, names: list[str], cache_dir) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for n in names:
        path = try_to_load_from_cache(repo, n, cache_dir=cache_dir)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def pretrained_file(name: str, tag: str, cache_dir: str | None = None) -> str:
    """A local file with the weights of open_clip tag `tag` of model `name`: from a cache,
    else downloaded. Raises `WeightsUnavailable` (fast) when it is neither cached nor
    downloadable."""
    from open_clip.pretrained import download_pretrained

    cfg = tag_config(name, tag)
    if not cfg:
        raise ValueError(f"pretrained: {tag!r} is not an open_clip weights tag of {name}")
    if "file" in cfg:
        return cfg["file"]
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub:
        repo, names = _hub_files(hub)
        cached = _cached_hub_file(repo, names, cache_dir)
        if cached is not None:
            return cached
        from huggingface_hub import constants

        where, probe = f"{repo} on the Hugging Face Hub", constants.ENDPOINT
    else:
        cached = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(url)
        if cached.is_file():
            return str(cached)
        where, probe = url, url
    why = "HF_HUB_OFFLINE is set" if _offline() and hub else unreachable(probe)
    if why is not None:
        host = urllib.parse.urlsplit(probe).netloc or probe
        raise WeightsUnavailable(
            f"pretrained: the {tag!r} weights of {name} are not cached on this machine and "
            f"cannot be downloaded from {where} ({host}: {why}). {OFFLINE_HELP}.")
    try:
        return download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 -- open_clip/hub raise many kinds; one message
        raise WeightsUnavailable(f"pretrained: downloading the {tag!r} weights of {name} from "
                                 f"{where} failed ({' '.join(str(exc).split())}). "
                                 f"{OFFLINE_HELP}.") from exc
