"""The policies a workbench offers, configured by whoever starts the server (``tarfas app --policies FILE``).

Analysts choose a policy by the name the operator gave it; its kind, endpoint, model, adapter and the
environment variable that holds its API key come from the file, never from the browser. A policy file
(TOML, or YAML when PyYAML is installed)::

    [policies.qwen-lab]               # the name analysts see
    kind = "vllm"                     # what core.policies.load_policy builds: expert, hf or vllm
    base_url = "http://10.0.0.5:8000/v1"
    model = "tarfas-qwen7b"
    api_key_env = "TARFAS_LAB_KEY"    # the NAME of the variable; its value is read on the server
    timeout_s = 120                   # any other keyword argument of that kind's loader

    [policies.nano-sft]
    kind = "hf"
    model = "/models/nano"
    adapter = "/runs/sft/adapter"

The built-in ``expert`` policy (offline, no endpoint, no secret) is always offered; a file may give
it options under that name. The file is checked when the server starts: an unknown kind or option, a
missing required option or an unset key variable stops it with a message naming the file and entry.

Browser-supplied keyword arguments, and kinds not named in the file, are refused (:class:`PolicyRefused`)
unless the server runs with ``allow_custom`` (``--allow-custom-policies``), which is only allowed on a
loopback address. Refusals say what was refused in plain words and never what the server has (which
variables are set, which paths exist).
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from core.errors import TarfasError
from core.policies import POLICY_NAMES

DEFAULT = "expert"
RESERVED = ("kind", "api_key_env", "description")  # entry keys that are not the loader's options
MAX_NAME = 64  # the runs' policy column


class CatalogError(TarfasError):
    """The policy file is unusable (a startup error for the operator: it may name files and variables)."""


class PolicyRefused(TarfasError):
    """An analyst's policy choice this server does not allow (the message is safe to show them)."""


@dataclass(frozen=True)
class PolicyEntry:
    """One selectable policy: what analysts see (``name``) and what the server builds (``kind`` + options)."""

    name: str
    kind: str
    options: tuple[tuple[str, Any], ...] = ()
    api_key_env: str | None = None
    description: str = ""

    def loader_kwargs(self) -> dict:
        kw = dict(self.options)
        if self.api_key_env:
            kw["api_key_env"] = self.api_key_env
        return kw


@dataclass
class PolicyCatalog:
    """The policies of one server, by name (``entries``), and whether analysts may also give their own."""

    entries: dict[str, PolicyEntry] = field(default_factory=lambda: {DEFAULT: PolicyEntry(DEFAULT, DEFAULT)})
    allow_custom: bool = False
    source: str | None = None  # the file they came from (None: the built-in default)

    # --- what analysts see --------------------------------------------------------------------
    def names(self) -> list[str]:
        """The names an analyst can choose, ``expert`` first; with ``allow_custom`` the bare kinds too
        (each then takes its arguments from the analyst)."""
        names = [DEFAULT] + sorted(n for n in self.entries if n != DEFAULT)
        if self.allow_custom:
            names += [k for k in POLICY_NAMES if k not in self.entries]
        return names

    # --- what the server builds ---------------------------------------------------------------
    def check(self, name: str, kwargs: Mapping[str, Any] | None = None) -> None:
        """Refuse (PolicyRefused) a choice this server does not allow: a name it does not offer, or any
        keyword argument from the browser unless custom policies are allowed."""
        self.resolve(name, kwargs)

    def resolve(self, name: str, kwargs: Mapping[str, Any] | None = None) -> tuple[str, dict]:
        """``(kind, loader keyword arguments)`` for a choice: the entry's options, plus the analyst's own
        arguments when custom policies are allowed (they win). Refused choices raise PolicyRefused."""
        kwargs = dict(kwargs or {})
        entry = self.entries.get(name)
        if entry is None and not (self.allow_custom and name in POLICY_NAMES):
            raise PolicyRefused(
                f"policy {_quote(name)} is not offered on this workbench; choose one of: {', '.join(self.names())}"
            )
        if kwargs and not self.allow_custom:
            raise PolicyRefused(
                "this workbench does not take policy arguments from the browser (endpoints, models, adapters and "
                f"keys are set by whoever runs the server); leave them empty and choose one of: {', '.join(self.names())}"
            )
        if entry is None:
            return name, kwargs
        return entry.kind, {**entry.loader_kwargs(), **kwargs}

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def load(
        cls, path: str | Path | None = None, *, allow_custom: bool = False, environ: Mapping[str, str] | None = None
    ) -> PolicyCatalog:
        """The catalog of a policy file (None: the built-in ``expert`` only). Raises CatalogError."""
        if path is None:
            return cls(allow_custom=allow_custom)
        path = Path(path)
        environ = os.environ if environ is None else environ
        data = _read(path)
        table = data.get("policies") if isinstance(data, dict) else None
        unknown = sorted(set(data) - {"policies"}) if isinstance(data, dict) else []
        if not isinstance(table, dict) or not table or unknown:
            raise CatalogError(
                f"{path}: expected a 'policies' table of named policies (e.g. [policies.qwen-lab] with kind = \"vllm\")"
                + (f"; unknown top-level keys: {', '.join(unknown)}" if unknown else "")
            )
        entries = {DEFAULT: PolicyEntry(DEFAULT, DEFAULT)}
        for name, spec in table.items():
            entries[name] = _entry(path, name, spec, environ)
        return cls(entries, allow_custom=allow_custom, source=str(path))


def parse_arguments(text: str | None) -> dict:
    """The browser's ``key=value, key=value`` policy arguments (``512`` -> 512, ``0.7`` -> 0.7, ``true``
    -> True; anything else, paths and URLs, stays text). Raises PolicyRefused on a malformed part."""
    out = {}
    for part in (text or "").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise PolicyRefused(f"policy arguments: expected key=value, got {part[:80]!r}")
        out[key.strip()] = _scalar(value.strip())
    return out


def _scalar(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) else text


def check_custom_host(host: str, allow_custom: bool) -> None:
    """``--allow-custom-policies`` lets analysts aim the server at any endpoint, model path or key
    variable: only on a loopback address, where the analyst is whoever started the server."""
    if allow_custom and not is_loopback(host):
        raise CatalogError(
            f"refusing --allow-custom-policies on {host}: it lets whoever uses the browser choose the endpoints, model "
            "paths and key variables the server uses; serve on 127.0.0.1 (or ::1) to use it, or list the policies "
            "in a --policies file"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read the policy file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CatalogError(f"{path}: not UTF-8 text") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise CatalogError(f"{path}: YAML policy files need PyYAML installed; write it as TOML instead") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CatalogError(f"{path}: not valid YAML: {exc}") from None
        return data if isinstance(data, dict) else {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML ({exc}); YAML files must end in .yaml or .yml") from None


def _entry(path: Path, name: str, spec, environ: Mapping[str, str]) -> PolicyEntry:
    where = f"{path}, policy {name!r}"
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise CatalogError(f"{where}: a policy name is 1 to {MAX_NAME} printable characters")
    if not isinstance(spec, dict):
        raise CatalogError(f"{where}: expected a table of settings (kind = ..., and its options)")
    kind = spec.get("kind")
    if kind not in POLICY_NAMES:
        raise CatalogError(f"{where}: kind must be one of {', '.join(POLICY_NAMES)}, not {kind!r}")
    if name in POLICY_NAMES and name != kind:
        raise CatalogError(f"{where}: the name {name!r} is a policy kind; give a {name} policy that name only")
    options = {k: v for k, v in spec.items() if k not in RESERVED}
    accepted, required = _signature(kind)
    key_env = spec.get("api_key_env")
    if key_env is not None:
        if "api_key_env" not in accepted:
            raise CatalogError(f"{where}: kind {kind} takes no API key (api_key_env)")
        if not isinstance(key_env, str) or not key_env:
            raise CatalogError(f"{where}: api_key_env is the name of an environment variable")
        if not environ.get(key_env):
            raise CatalogError(f"{where}: environment variable {key_env} (its API key) is not set")
    bad = sorted(set(options) - accepted - {"api_key_env"})
    if bad:
        raise CatalogError(
            f"{where}: unknown option(s) {', '.join(bad)} for kind {kind}; it takes: {', '.join(sorted(accepted))}"
        )
    missing = sorted(r for r in required if r not in options)
    if missing:
        raise CatalogError(f"{where}: kind {kind} needs {', '.join(missing)}")
    description = spec.get("description", "")
    return PolicyEntry(name, kind, tuple(sorted(options.items())), key_env, str(description))


def _signature(kind: str) -> tuple[set[str], set[str]]:
    """The keyword arguments ``core.policies.load_policy(kind, ...)`` takes, and those it requires, read
    from the loaders themselves."""
    if kind == "expert":
        from core.policies.expert import ExpertPolicy

        funcs, skip = [ExpertPolicy.load], set()
    elif kind == "hf":
        from core.policies.hf import HFPolicy

        funcs, skip = [HFPolicy.load, HFPolicy.__init__], {"loaded", "model_dir"}
    else:
        from core.policies.openai_chat import OpenAIChatPolicy

        funcs, skip = [OpenAIChatPolicy.__init__], set()
    accepted, required = set(), set()
    for f in funcs:
        for p in inspect.signature(f).parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in skip | {"self", "cls"}:
                continue
            accepted.add(p.name)
            if p.default is p.empty:
                required.add(p.name)
    return accepted, required


def _quote(name) -> str:
    text = str(name)
    return repr(text if len(text) <= MAX_NAME else text[:MAX_NAME] + "...")


__all__ = [
    "CatalogError",
    "PolicyCatalog",
    "PolicyEntry",
    "PolicyRefused",
    "check_custom_host",
    "is_loopback",
    "parse_arguments",
]
