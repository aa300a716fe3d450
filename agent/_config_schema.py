"""The agent configuration's schema: every section and key, its type, bounds and default.

The single source of truth for what ``agent.toml`` may contain. ``validate`` checks a
parsed document against it (unknown keys and sections with "did you mean", types, bounds,
URLs, files) and returns every key's resolved value, defaults included; the loader
(``_config.py``) builds its dataclasses from that and from nothing else, and
``agent check-config`` prints it. No TPM, no network: only the files the keys name are
looked at (``stat``, never read, except the bounded config file itself).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from modelward.agent.errors import ConfigError
from modelward.trust._display import escape
from modelward.trust._plain import Frozen
from modelward.updater import _defaults as d
from modelward.updater.bundle._names import MODEL_NAME

DEFAULT_CONFIG = Path("/etc/modelward/agent.toml")
MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes
MAX_SECRET_BYTES = 4096  # a password file
HINT = "see README \"Configuration\" for every key, or run `modelward agent check-config`"

TOP = ""  # the section name of top-level keys
ACTIVATION_TIMEOUT = 30.0  # seconds each activation command may take (ActivationConfig)
_SECONDS_MAX = 1e7  # ~115 days: more is a typo (ms for s), not a setting


class Key(Frozen):
    """One setting.

    Attributes:
        kind: how its value is checked: ``str``, ``name`` (an id safe in an MQTT topic),
            ``int``, ``number``, ``bool``, ``url`` (https://host/...), ``file`` (an existing
            readable regular file, relative to the config's directory), ``path`` (a path,
            relative to the config's directory, need not exist), ``size`` (bytes or
            "512M"), ``strs`` (a list of strings), ``windows`` (``HH:MM-HH:MM`` strings),
            ``enum`` (one of ``choices``), ``host`` (a host name or address, no URL).
        default: the value when absent (None: not set).
        required: must be present (in its section, when the section is present).
        lo, hi: inclusive bounds of a number (``lo_open``: ``lo`` itself is refused).
        secret: printed as ``<set>``, never its value.
        note: what a default of None means, for ``check-config``.
    """

    __slots__ = ("kind", "default", "required", "lo", "hi", "lo_open", "choices", "secret",
                 "note")
    kind: str
    default: Any
    required: bool
    lo: float | None
    hi: float | None
    lo_open: bool
    choices: tuple[str, ...]
    secret: bool
    note: str

    def __init__(self, kind: str, default: Any = None, required: bool = False,
                 lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 choices: tuple[str, ...] = (), secret: bool = False, note: str = "") -> None:
        self._set(kind, default, required, lo, hi, lo_open, choices, secret, note)


def _secs(default: float | None, lo: float = 0.0, lo_open: bool = True, hi: float = _SECONDS_MAX,
          note: str = "") -> Key:
    return Key("number", default, lo=lo, hi=hi, lo_open=lo_open, note=note)


#: section -> key -> Key. Sections other than TOP are optional tables; [https] or [mqtt]
#: must be present (the loader checks).
SCHEMA: dict[str, dict[str, Key]] = {
    TOP: {
        "device_id": Key("name", required=True),
        "fleet": Key("name", required=True),
        "state_dir": Key("path", required=True),
        "tcti": Key("str", required=True),
        "model": Key("name", required=True),
        "transport": Key("enum", "auto", choices=("auto", "https", "mqtt")),
        "channel": Key("name", "stable"),
    },
    "agent": {
        "poll_interval": _secs(3600.0),
        "announce_spread": _secs(d.ANNOUNCE_SPREAD, lo_open=False, hi=86400),
        "tpm_wait": _secs(120.0, lo_open=False),
    },
    "https": {
        "metadata_url": Key("url", required=True),
        "targets_url": Key("url", required=True),
        "ca_file": Key("file", note="the system CA store"),
        "min_speed": Key("int", d.HTTPS_MIN_SPEED, lo=1, hi=1 << 30),
        "min_speed_window": _secs(d.HTTPS_MIN_SPEED_WINDOW, hi=86400),
        "header_timeout": _secs(d.HTTPS_HEADER_TIMEOUT, hi=86400),
        "metadata_timeout": _secs(d.HTTPS_METADATA_TIMEOUT, hi=86400),
    },
    "mqtt": {
        "host": Key("host", required=True),
        "port": Key("int", required=True, lo=1, hi=65535),
        "ca_file": Key("file", note="the system CA store"),
        "cert_file": Key("file", note="no client certificate"),
        "key_file": Key("file", note="no client certificate"),
        "username": Key("str", note="device_id"),
        "password": Key("str", secret=True, note="no password"),
        "password_file": Key("file", note="no password"),
        "connect_timeout": _secs(d.MQTT_CONNECT_TIMEOUT, hi=86400),
        "block_timeout": _secs(d.MQTT_BLOCK_TIMEOUT, hi=86400),
        "max_retries": Key("int", d.MQTT_MAX_RETRIES, lo=1, hi=1000),
    },
    "health": {
        "timeout": _secs(d.HEALTH_TIMEOUT, hi=1e6),
        "max_memory": Key("size", note="half the available memory, at most 2G"),
        "max_cpu_seconds": _secs(None, hi=1e6, note="timeout"),
        "nice": Key("int", d.HEALTH_NICE, lo=0, hi=19),
        "unsafe_no_sandbox": Key("bool", d.HEALTH_UNSAFE_NO_SANDBOX),
    },
    "idle": {
        "busy_file": Key("path", note="no busy signal"),
        "max_queue_depth": Key("int", 0, lo=0, hi=1 << 31),
        "busy_stale_after": _secs(300.0),
        "min_cpu_idle": Key("number", None, lo=0.0, hi=1.0, note="not checked"),
        "cpu_window": _secs(5.0, hi=3600),
        "max_load": Key("number", None, lo=0.0, hi=1e6, lo_open=True, note="not checked"),
        "require_mains": Key("bool", False),
        "windows": Key("windows", ()),
        "poll": _secs(1.0, hi=3600),
    },
    "activation": {
        "command": Key("strs", ()),
        "timeout": _secs(ACTIVATION_TIMEOUT, hi=86400),
    },
    "metrics": {
        "textfile": Key("path", note="STATE_DIR/metrics.prom"),
    },
}

#: Keys that were removed: accepted and ignored, with this notice (logged whenever the
#: config loads, printed by ``check-config``), so an upgraded device with its old config
#: keeps booting and serving. ``{unit}`` is the configured value without ``.service``.
REMOVED: dict[tuple[str, str], str] = {
    ("activation", "reload_unit"): (
        "removed and ignored: the agent is unprivileged and never ran systemctl; systemd "
        "reloads the unit itself: `systemctl enable --now modelward-activate@{unit}.path`, "
        "then delete this key"),
    ("activation", "restart"): (
        "removed and ignored (it went with reload_unit: modelward-activate@UNIT.service "
        "reloads with the unit's ExecReload=, else restarts it); delete this key"),
}


def removed_notice(path: Path, section: str, key: str, value: Any) -> str:
    """The one-line notice of a removed key (see :data:`REMOVED`)."""
    unit = value.removesuffix(".service") if isinstance(value, str) and value else "UNIT"
    return f"{path}: {where(section, key)}: " + REMOVED[section, key].format(
        unit=escape(unit, 80))


_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # (a URL where a path goes)
_NAME = MODEL_NAME  # (one rule: what `bundle build` and the manifest parser accept)
_HOST = re.compile(r"[A-Za-z0-9._:\[\]-]{1,253}")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MIN_MEMORY = 64 << 20


class Resolved:
    """Every key's value after validation, defaults included (``get`` records what a
    caller read, so a test can check that the loader reads the whole schema)."""

    def __init__(self, path: Path, values: dict[str, dict[str, Any]],
                 present: frozenset[str], given: frozenset[tuple[str, str]],
                 section_order: tuple[str, ...] = ()) -> None:
        self.path = path
        self.section_order = section_order  # sections in file order
        self.values = values
        self.present = present  # sections in the file (TOP always)
        self.given = given  # (section, key) set in the file, not defaulted
        self.read: set[tuple[str, str]] = set()
        self.notices: tuple[str, ...] = ()  # removed keys found (REMOVED), one line each

    def get(self, section: str, key: str) -> Any:
        """The resolved value of ``[section] key``."""
        self.read.add((section, key))
        return self.values[section][key]

    def lines(self) -> Iterator[str]:
        """The effective configuration, TOML-like: every key with its value (``# default``
        where it was not set), secrets as ``<set>``."""
        yield f"# effective configuration of {self.path} (defaults included)"
        for notice in self.notices:
            yield f"# {notice}"
        for section, keys in SCHEMA.items():
            if section != TOP:
                yield ""
                if section not in self.present and section in ("https", "mqtt"):
                    yield f"# [{section}]: not configured"
                    continue
                yield f"[{section}]"
            for name, spec in keys.items():
                value = self.values[section][name]
                default = "" if (section, name) in self.given else "  # default"
                if value is None:
                    yield f"# {name}: not set ({spec.note or 'none'})"
                elif spec.secret:
                    yield f"{name} = <set>"
                else:
                    yield f"{name} = {_toml(value)}{default}"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def where(section: str, key: str = "") -> str:
    """How a message names a key: ``[https] ca_file``, ``device_id``, ``[helth]``; an
    unknown key or section is the file's text, escaped (one line, printable)."""
    section, key = escape(section, 80), escape(key, 80)
    if section == TOP:
        return key
    return f"[{section}] {key}" if key else f"[{section}]"


def quoted(v: str) -> str:
    """A value of the file in a message: quoted, escaped (one printable line), cut."""
    return f"'{escape(v, 120)}'"


def dotted(section: str, key: str) -> str:
    """The ``ConfigError.key`` of a setting: ``https.ca_file``, ``device_id``."""
    return f"{section}.{key}" if section != TOP else key


def _err(path: Path, section: str, key: str, problem: str, hint: str = HINT) -> ConfigError:
    return ConfigError(f"{path}: {where(section, key)}: {problem}", path=str(path),
                       key=dotted(section, key) if key else section, hint=hint)


def read_document(path: Path) -> dict[str, Any]:
    """The parsed TOML of the config file (symlinks followed: it is the operator's file),
    a regular file of at most :data:`MAX_CONFIG_BYTES`, UTF-8.

    Raises:
        ConfigError: missing, unreadable, not a regular file, too large, not UTF-8 or not
            TOML.
    """
    hint = (f"pass --config PATH, or write {DEFAULT_CONFIG} (README \"Configuration\")"
            if path == DEFAULT_CONFIG else HINT)
    try:
        data = _read_regular(path, MAX_CONFIG_BYTES)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}", path=str(path),
                          hint=hint) from e
    except ValueError as e:
        raise ConfigError(f"cannot read config {path}: {e}", path=str(path), hint=hint) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): {e.reason}",
                          path=str(path), hint=hint) from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}", path=str(path), hint=hint) from e
    except (ValueError, RecursionError) as e:  # an integer of 4301 digits; [[[[... nested
        raise ConfigError(f"{path} is not a usable TOML file: {str(e)[:100]}", path=str(path),
                          hint=hint) from e


def _open_regular(path: Path) -> int:
    """An fd of ``path`` if it is a regular file (a FIFO does not block the open).

    Raises:
        OSError: cannot be opened.
        ValueError: not a regular file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    return fd


def _read_regular(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file.

    Raises:
        OSError: cannot be read.
        ValueError: not a regular file, or larger than ``limit``.
    """
    fd = _open_regular(path)
    try:
        chunks, n = [], 0
        while n <= limit and (chunk := os.read(fd, min(65536, limit + 1 - n))):
            chunks.append(chunk)
            n += len(chunk)
    finally:
        os.close(fd)
    if n > limit:
        raise ValueError(f"larger than {limit} bytes")
    return b"".join(chunks)


def read_secret(path: Path, section: str, key: str, config: Path) -> str:
    """The stripped UTF-8 text of a secret file named by ``[section] key`` (bounded).

    Raises:
        ConfigError: unreadable, not a regular file, too large, not UTF-8.
    """
    try:
        return _read_regular(path, MAX_SECRET_BYTES).decode("utf-8").strip()
    except OSError as e:
        raise _err(config, section, key, f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError:  # no cause chained: its text quotes a byte of the secret and
        # its offset, which a --debug traceback would print
        raise _err(config, section, key, f"{path} is not UTF-8 text") from None
    except ValueError as e:
        raise _err(config, section, key, f"{path}: {e}") from e


def suggest(word: str, candidates: list[str]) -> str:
    """``"; did you mean X?"`` for the closest candidate, or ""."""
    import difflib  # only on a mistake: not on the boot path

    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown(doc: dict[str, Any], path: Path) -> None:
    """Refuse the first unknown section or key (a typo must never mean the default)."""
    sections = [s for s in SCHEMA if s != TOP]
    for name, value in doc.items():
        if name in SCHEMA[TOP]:
            continue
        if name in sections:
            if not isinstance(value, dict):
                raise _err(path, name, "", "must be a table (a [section] heading)")
            for key in value:
                if key not in SCHEMA[name] and (name, key) not in REMOVED:
                    raise _err(path, name, key, "unknown key" + _elsewhere(key, name))
            continue
        if isinstance(value, dict):
            close = suggest(name, sections)  # "; did you mean health?"
            raise _err(path, name, "", "unknown section"
                       + (close.replace("mean ", "mean [").replace("?", "]?") if close else
                          f" (known: {', '.join(f'[{s}]' for s in sections)})"))
        raise _err(path, TOP, name, "unknown key" + _elsewhere(name, TOP))


def _elsewhere(key: str, section: str) -> str:
    """A suggestion for an unknown key: the same key in another section, or a close one."""
    for other, keys in SCHEMA.items():
        if other != section and key in keys:
            return f"; it belongs {'at the top' if other == TOP else f'in [{other}]'}"
    return suggest(key, list(SCHEMA[section]))


def validate(doc: dict[str, Any], path: Path) -> Resolved:
    """Check a parsed config against :data:`SCHEMA`; relative paths are resolved against
    the config's directory.

    Raises:
        ConfigError: the first key at fault (unknown, missing, mistyped, out of bounds, a
            URL that is not https://host/..., a file that is not a readable regular file).
    """
    _unknown(doc, path)
    base = path.absolute().parent  # the daemon's paths must not depend on its cwd
    values: dict[str, dict[str, Any]] = {}
    given: set[tuple[str, str]] = set()
    present = {TOP} | {s for s in SCHEMA if s in doc}
    for section, keys in SCHEMA.items():
        table = doc if section == TOP else doc.get(section, {})
        out: dict[str, Any] = {}
        for name, spec in keys.items():
            if name in table:
                given.add((section, name))
                out[name] = _check(spec, table[name], base, _blame(path, section, name))
            elif spec.required and section in present:
                raise _err(path, section, name, "missing (required)" if section == TOP else
                           f"missing (required in [{section}])")
            else:
                out[name] = spec.default
        values[section] = out
    order = tuple(s for s in doc if s in SCHEMA and s != TOP)
    r = Resolved(path, values, frozenset(present), frozenset(given), order)
    r.notices = tuple(removed_notice(path, sec, key, doc[sec][key])
                      for sec, key in REMOVED if isinstance(doc.get(sec), dict) and
                      key in doc[sec])
    return r


def _blame(path: Path, section: str, key: str) -> Callable[[str], ConfigError]:
    def err(problem: str) -> ConfigError:
        return _err(path, section, key, problem)
    return err


def _check(spec: Key, v: Any, base: Path, err: Callable[[str], ConfigError]) -> Any:
    """The checked (and converted) value of one key."""
    kind = spec.kind
    if spec.secret and not isinstance(v, str):
        raise err(f"must be a string, not {type(v).__name__} (value not shown: a secret)")
    if kind == "bool":
        if not isinstance(v, bool):
            raise err(f"must be true or false, not {_show(v)}")
        return v
    if kind in ("int", "number"):
        return _number(spec, v, err)
    if kind == "size":
        return _size(v, err)
    if kind in ("strs", "windows"):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise err(f"must be a list of strings, not {_show(v)}")
        if not all(x and "\0" not in x for x in v):
            raise err("must be a list of non-empty strings without NUL")
        if kind == "windows":
            from modelward.updater.idle import TimeRange

            for w in v:
                try:
                    TimeRange.parse(w)
                except ValueError as e:
                    raise err(f"{quoted(w)} is not HH:MM-HH:MM: {e}") from e
        return tuple(v)
    if not isinstance(v, str):  # (a secret's value is never shown, only its type)
        raise err(f"must be a string, not {type(v).__name__ if spec.secret else _show(v)}")
    if not v or any(ord(c) < 0x20 or ord(c) == 0x7f for c in v):
        raise err("must be a non-empty string without control characters")
    if kind == "name" and not _NAME.fullmatch(v):
        raise err(f"{quoted(v)} must be letters, digits, '.', '_' or '-' (at most 128), "
                  "starting with a letter or digit")
    if kind == "enum" and v not in spec.choices:
        raise err(f"{quoted(v)} must be one of {', '.join(repr(c) for c in spec.choices)}"
                  + suggest(v, list(spec.choices)))
    if kind == "host":
        return _host(v, err)
    if kind == "url":
        return _url(v, err)
    if kind in ("path", "file") and v.startswith("~"):  # (whose home would it be?)
        raise err(f"{quoted(v)}: '~' is not expanded; write the absolute path")
    if kind in ("path", "file") and (m := _URL_SCHEME.match(v)):
        raise err(f"{quoted(v)} is a {m.group()} URL; this key takes a local path")
    if kind == "path":
        return base / v
    if kind == "file":
        p = base / v
        try:
            os.close(_open_regular(p))
        except OSError as e:
            raise err(f"cannot read {p}: {e.strerror or e}") from e
        except ValueError as e:
            raise err(f"{p} is {e}") from e
        return p
    return v


def _show(v: Any) -> str:
    """``int 5`` or ``str '60'``, cut (a value of 4000 digits is no message)."""
    text = repr(v) if not isinstance(v, int) or abs(v) < 10 ** 30 else "a huge number"
    return f"{type(v).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _number(spec: Key, v: Any, err: Callable[[str], ConfigError]) -> float | int:
    lo, hi = spec.lo, spec.hi
    want = "an integer" if spec.kind == "int" else "a number"
    ok = isinstance(v, int) if spec.kind == "int" else isinstance(v, int | float)
    if isinstance(v, bool) or not ok:
        raise err(f"must be {want}, not {_show(v)}")
    bad = isinstance(v, float) and not math.isfinite(v)  # nan, inf
    if bad or (lo is not None and (v < lo or (spec.lo_open and v == lo))) \
            or (hi is not None and v > hi):
        low = "" if lo is None else (f"above {lo:g}" if spec.lo_open else f"at least {lo:g}")
        high = "" if hi is None else f"at most {hi:g}"
        raise err(f"must be {want} {' and '.join(x for x in (low, high) if x)}, not "
                  f"{_show(v).split(' ', 1)[1]}")
    return v if spec.kind == "int" else float(v)


def _size(v: Any, err: Callable[[str], ConfigError]) -> int:
    """A size: bytes as an integer, or a string such as ``"512M"`` / ``"2GiB"``."""
    n: float | None = None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and (m := _SIZE.fullmatch(v.strip())):
        n = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if n is None or not MIN_MEMORY <= n <= (1 << 50):
        raise err(f"must be a size of at least 64M (bytes, or a string like \"512M\" or "
                  f"\"2G\"), not {_show(v)}")
    return int(n)


def _redacted(v: str) -> str:
    """A URL as a message may show it: everything between ``scheme://`` and the last
    ``@`` (a userinfo, however the password is spelled) replaced."""
    if "@" not in v:
        return quoted(v)
    scheme, sep, rest = v.partition("://")
    head = scheme + sep if sep else ""
    return quoted(head + "<credentials>@" + (rest if sep else v).rpartition("@")[2])


def _url(v: str, err: Callable[[str], ConfigError]) -> str:
    """An ``https://host[:port]/...`` base URL; no userinfo, whitespace, port 0, query or
    fragment (each refused naming the URL with any userinfo redacted)."""
    from urllib.parse import urlsplit  # ~2 ms, only for a device with [https]

    shown = _redacted(v)
    if "@" in v:  # before parsing: a password with '/' or ':' splits the URL anywhere
        raise err(f"{shown}: credentials do not belong in a URL (they would be logged); "
                  "a '@' is refused anywhere in it")
    if any(c.isspace() for c in v):
        raise err(f"{shown} contains whitespace (percent-encode a space in a path; a "
                  "copy-paste may have added it at either end)")
    try:
        u = urlsplit(v)
        host = u.hostname
        port = u.port  # raises ValueError on a bad port
    except ValueError as e:
        raise err(f"{shown} is not a URL: {e}") from e
    if not v.startswith("https://"):  # literally, as the fetcher checks it
        raise err(f"{shown} is not an https:// URL (modelward only fetches over TLS)")
    if not host:
        raise err(f"{shown} has no host")
    if port == 0:
        raise err(f"{shown}: port 0 is no port (leave it out for 443)")
    if u.query or u.fragment or "?" in v or "#" in v:
        raise err(f"{shown}: a base URL has no query or fragment")
    return v


def _host(v: str, err: Callable[[str], ConfigError]) -> str:
    """A host name, an IPv4 address or an IPv6 address without brackets; never
    ``host:port`` or a URL."""
    import ipaddress

    hint = "(the port goes in 'port'; the connection is always TLS)"
    if "://" in v or not _HOST.fullmatch(v):
        raise err(f"{quoted(v)} must be a host name or address {hint}")
    if ":" in v or "[" in v or "]" in v:
        try:
            ipaddress.IPv6Address(v)
        except ValueError as e:
            raise err(f"{quoted(v)} looks like host:port or a bracketed address; write the "
                      f"host name or address alone {hint}") from e
    return v
