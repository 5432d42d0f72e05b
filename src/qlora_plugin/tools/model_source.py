"""The MODEL argument of ``qlora inspect`` and ``qlora estimate``, checked before anything heavy is imported.

It may be a model directory, an Axolotl YAML (its ``base_model`` is read, relative paths
from the working directory as Axolotl reads them) or a hub id. What cannot work fails at
once with one line: a file that is no config, a directory without ``config.json``, a path
that does not exist, a config without ``base_model``, and a hub id the hub cannot answer
(offline, or unreachable: no retries).
"""

from __future__ import annotations

import os
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from qlora_plugin.core.errors import QLoRAConfigError
from qlora_plugin.core.files import hub_offline, looks_local, read_json, require
from qlora_plugin.integrations.axolotl.section import SECTION
from qlora_plugin.tools.preflight import read_config

CONFIG_SUFFIXES = (".yml", ".yaml")
DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_SECONDS = 3.0
WHAT_TO_GIVE = "a model directory (holding config.json), an Axolotl YAML with base_model, or a hub id"


@dataclass(frozen=True)
class ModelSource:
    """What a MODEL argument names: the model (directory or hub id) and, for an Axolotl YAML, its ``qlora:`` section."""

    model: str
    section: dict[str, Any] | None = None


def model_source(argument: str) -> ModelSource:
    """The model that ``argument`` names; a one-line error where there is none to read."""
    path = Path(os.path.expanduser(argument))
    if path.is_file():
        if path.suffix.lower() not in CONFIG_SUFFIXES:
            raise QLoRAConfigError("model", argument, "is a file, not a directory", f"pass {WHAT_TO_GIVE}")
        return _from_config(path)
    return ModelSource(_model(argument, "model"))


def _from_config(config_path: Path) -> ModelSource:
    """The ``base_model`` an Axolotl YAML names (checked like any MODEL argument) and its ``qlora:`` section."""
    config = read_config(config_path)
    base = config.get("base_model")
    field = f"{os.fspath(config_path)}: base_model"
    if not base or not isinstance(base, str):
        raise QLoRAConfigError(
            field,
            base,
            "is not set, so the config names no model",
            f"set base_model in the config, or pass {WHAT_TO_GIVE}",
        )
    section = config.get(SECTION)
    return ModelSource(_model(base, field), section if isinstance(section, dict) else None)


def _model(value: str, field: str) -> str:
    """``value`` if it is a model directory, or a hub id the hub (or its local cache) can answer."""
    if looks_local(value):
        where = f"relative paths are read from {os.getcwd()}"
        directory = require(value, "directory", field, f"pass the directory a model was saved to ({where})")
        if not os.path.lexists(directory / "config.json"):
            raise QLoRAConfigError(
                field, value, "holds no config.json, so it is no model directory", "pass the model's own directory"
            )
        read_json(directory / "config.json", field, "restore the model's config.json")  # each fault by name
        return value
    _check_hub(value, field)
    return value


def _check_hub(repo_id: str, field: str) -> None:
    """Return if the hub can give ``repo_id``'s config now; raise at once where it cannot.

    Offline (``HF_HUB_OFFLINE``), only the local hub cache can; online, one connection to
    the endpoint with a short timeout decides, instead of the hub client's retries. With
    the endpoint unreachable but the config cached, the cache is used (offline from here on).
    """

    cached = _cached(repo_id)
    if hub_offline():
        if cached:
            return
        raise QLoRAConfigError(
            field,
            repo_id,
            "is no local directory nor in the hub cache, and HF_HUB_OFFLINE is set, so the hub is not asked",
            "pass a local model directory, or unset HF_HUB_OFFLINE to let the hub be asked for this id",
        )
    endpoint = os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    problem = _unreachable(endpoint)
    if problem is None:
        return
    if cached:
        os.environ["HF_HUB_OFFLINE"] = "1"  # read the cached copy without the client's retries
        return
    raise QLoRAConfigError(
        field,
        repo_id,
        f"is no local directory, and the hub at {endpoint} cannot be reached ({problem})",
        "pass a local model directory, or run where the hub is reachable",
    )


def _cached(repo_id: str) -> bool:
    """True if the hub cache on this machine holds ``repo_id``'s config.json."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id after all
        return False


def _unreachable(endpoint: str) -> str | None:
    """Why a TCP connection to ``endpoint`` (or the proxy set for it) fails within :data:`PROBE_SECONDS`, or None."""
    url = urlparse(endpoint)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host = url.hostname or ""
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return None
    except OSError as error:
        return " ".join(str(error).split()) or type(error).__name__
