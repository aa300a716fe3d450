"""Mosquitto configuration for a fleet: mosquitto's dynamic-security plugin, one
credential per device, topic ACLs checked at SUBSCRIBE as well as on delivery.

Each device has two identities with its one password: its listener (username ``<id>``,
client id ``<id>-listen``: reads the announcement, writes its status) and its fetcher
(username ``<id>:fetch``, which no device id can be, client id ``<id>-fetch``: writes its
requests, reads its responses). Each is bound to its client id, so one device holds at
most two sessions, whatever it tries (a new CONNECT with the bound id takes the old
session's place; any other client id is refused at CONNECT).

Topics (design.md "Transports"), under ``modelward/<fleet>/``:

* ``announce`` - retained hint; the operator writes, devices read;
* ``repo/req/<device>`` - a device's block requests; the bridges read. The device id in
  the topic (not only in the MQTT 5 response-topic property, which no broker ACL can
  check) is what binds a request to its sender: the bridge answers only on
  ``devices/<device>/repo/resp``, and the ACL lets a device write only its own id;
* ``devices/<device>/repo/resp`` - the bridges write, that device reads;
* ``devices/<device>/status`` - that device writes (retained), the operator reads;
* ``devices/<device>/rpc/req`` - the operator writes (attest and audit requests), that
  device's listener reads; ``devices/<device>/rpc/resp`` - that listener writes its
  answers, the operator reads (``modelward.updater.transport._rpc``).

A device may read no topic it may write: nothing it publishes comes back to one of its
own sessions, so it cannot fill a parked session of its own with whatever it sends
(mosquitto 2.0 bounds queued payload bytes but not property bytes, ~12 MiB of broker
memory for one 1 MiB packet of empty user properties). No ACL can stop a device from
*retaining* on its request topic (mosquitto has no per-topic retain setting): the bridge
ignores retained requests (``modelward.publisher._bridge``).
"""

from __future__ import annotations

import base64
import errno
import grp
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from modelward.publisher.errors import OperatorInputError
from modelward.trust._atomic import write_atomic
from modelward.updater._config import (
    MqttConfig,
    fetch_client_id,
    fetch_username,
    listen_client_id,
)

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: `$` would allow a "\n"
BRIDGE_USER = "modelward-bridge"
OPERATOR_USER = "modelward-operator"
DYNSEC_FILE = "dynamic-security.json"
# PBKDF2 iterations of a password entry. mosquitto hashes the password on every CONNECT,
# so the cost is paid by the broker each time any device (re)connects; the passwords are
# 192 random bits (never guessed, whatever the iterations), so mosquitto's own default is
# enough (measured with mosquitto 2.0.11: see docs/brokers.md).
DYNSEC_ITERATIONS = 101


def check_id(kind: str, value: str) -> str:
    """A device id, user or fleet name usable in topics and ACLs.

    Raises:
        OperatorInputError: empty, too long, or with MQTT wildcard/separator characters.
    """
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise OperatorInputError(
            f"{kind} {value!r} must be 1-64 of A-Z a-z 0-9 . _ - (no '/', '+', '#')"
        )
    return value


def check_distinct(users: list[str]) -> None:
    """No two of ``users`` are the same id, even ignoring case: ``Dev-1`` and ``dev-1`` are
    two identities to mosquitto but one credential file on a case-insensitive filesystem
    (macOS, Windows, a FAT stick), where the second written would replace the first.

    Raises:
        OperatorInputError: naming both ids.
    """
    seen: dict[str, str] = {}
    for u in users:
        other = seen.get(u.lower())
        if other is not None:
            why = "" if other == u else " (they differ only in case: one credential file " \
                "on a case-insensitive filesystem)"
            raise OperatorInputError(f"duplicate ids {other!r} and {u!r}{why}")
        seen[u.lower()] = u


def _acl(acltype: str, topic: str) -> dict[str, object]:
    return {"acltype": acltype, "topic": topic, "allow": True}


def _reads(topic: str) -> list[dict[str, object]]:
    """Subscribe to ``topic`` (checked at SUBSCRIBE), receive it, unsubscribe from it.
    A ``+`` in ``topic`` makes it a pattern (``$share/+/...`` covers any group)."""
    kind = "Pattern" if "+" in topic or "#" in topic else "Literal"
    return [_acl(f"subscribe{kind}", topic), _acl(f"unsubscribe{kind}", topic),
            _acl("publishClientReceive", topic.split("/", 2)[2]
                 if topic.startswith("$share/") else topic)]


def roles(fleet: str, devices: list[str]) -> list[dict[str, object]]:
    """The dynamic-security roles of a fleet: one per service, two per device.

    Every SUBSCRIBE is checked against ``subscribeLiteral``/``subscribePattern`` (the
    default denies), so a device may subscribe only its announcement (listener) or its
    own response topic (fetcher), and no ``$share/...``, ``$CONTROL/...`` or ``$SYS``
    filter. A device may read no topic it may write (see the module docstring).
    """
    f = f"modelward/{check_id('fleet', fleet)}"
    out: list[dict[str, object]] = [
        # Bridges answer block requests, read in their (secret) shared group (or alone:
        # the bridge's credential may read every request anyway).
        {"rolename": BRIDGE_USER,
         "acls": [*_reads(f"$share/+/{f}/repo/req/+"), *_reads(f"{f}/repo/req/+"),
                  _acl("publishClientSend", f"{f}/devices/+/repo/resp")]},
        # The operator announces and watches the fleet.
        {"rolename": OPERATOR_USER,
         "acls": [_acl("publishClientSend", f"{f}/announce"),
                  *_reads(f"{f}/devices/+/status"), *operator_rpc_acls(f)]},
    ]
    for d in devices:
        out.append({"rolename": listen_role(d),
                    "acls": [*_reads(f"{f}/announce"),
                             _acl("publishClientSend", f"{f}/devices/{d}/status"),
                             *device_rpc_acls(f, d)]})
        out.append({"rolename": fetch_role(d),
                    "acls": [_acl("publishClientSend", f"{f}/repo/req/{d}"),
                             *_reads(f"{f}/devices/{d}/repo/resp")]})
    return out


def operator_rpc_acls(prefix: str) -> list[dict[str, object]]:
    """The operator's side of the request channel (``modelward.updater.transport._rpc``):
    it writes any device's ``rpc/req`` and reads every ``rpc/resp``, never a request."""
    return [_acl("publishClientSend", f"{prefix}/devices/+/rpc/req"),
            *_reads(f"{prefix}/devices/+/rpc/resp")]


def device_rpc_acls(prefix: str, device: str) -> list[dict[str, object]]:
    """A device listener's side of the request channel: it reads only its own
    ``rpc/req`` and writes only its own ``rpc/resp`` (it reads no topic it writes)."""
    return [*_reads(f"{prefix}/devices/{device}/rpc/req"),
            _acl("publishClientSend", f"{prefix}/devices/{device}/rpc/resp")]


def listen_role(device: str) -> str:
    """The role of a device's listener identity (``<id>``)."""
    return f"device-listen:{device}"


def fetch_role(device: str) -> str:
    """The role of a device's fetcher identity (``<id>:fetch``)."""
    return f"device-fetch:{device}"


def dynsec_client(username: str, password: str, role: str, clientid: str | None,
                  iterations: int = DYNSEC_ITERATIONS) -> dict[str, object]:
    """A dynamic-security client entry: PBKDF2-HMAC-SHA512 (64 bytes) of ``password``
    with a random 12-byte salt, as ``mosquitto_ctrl dynsec init`` writes it; bound to
    ``clientid`` unless None (a CONNECT with any other client id is refused)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    c: dict[str, object] = {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
        "roles": [{"rolename": role}],
    }
    if clientid is not None:
        c["clientid"] = clientid
    return c


def dynsec_document(fleet: str, passwords: dict[str, str],
                    iterations: int = DYNSEC_ITERATIONS) -> dict[str, object]:
    """The dynamic-security configuration for ``fleet``: ``passwords`` maps the bridge,
    operator and every device id to its password. Each device gets two clients, its
    listener (username = id) and its fetcher (:func:`fetch_username`), each bound to one
    client id; the bridge and operator are unbound (several bridges run at once)."""
    devices = [u for u in passwords if u not in (BRIDGE_USER, OPERATOR_USER)]
    clients = [dynsec_client(u, passwords[u], u, None, iterations)
               for u in (BRIDGE_USER, OPERATOR_USER) if u in passwords]
    for d in devices:
        clients.append(dynsec_client(d, passwords[d], listen_role(d),
                                     listen_client_id(d), iterations))
        clients.append(dynsec_client(fetch_username(d), passwords[d], fetch_role(d),
                                     fetch_client_id(d), iterations))
    return {
        "clients": clients,
        "groups": [],
        "roles": roles(fleet, devices),
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": False},
    }

# What a broker needs for modelward beyond the ACL and passwords. ``set_tcp_nodelay``:
# every block request and small metadata answer is a request/response, and with Nagle's
# algorithm each waited ~40 ms for the delayed ACK of the one before (a refresh over
# MQTT took 90 ms per file instead of 2 ms). 1 MiB blocks, 16 in flight per device.
#
# Byte bounds (issue 14: one device's credentials must not be able to grow the broker):
# the largest packet anyone legitimately sends is a bridge's block answer (one block plus
# its header, topic and properties, the same bound a device asks for on CONNECT), so
# ``max_packet_size`` is that; a device's status report (``modelward.trust._report``, 64 KiB) and
# an announcement (64 KiB) fit far inside it. A larger packet ends the sender's
# connection before mosquitto buffers it, so nothing oversized is forwarded or
# retained: mosquitto 2.0 has no separate limit for retained messages, the packet size
# is their bound. Per client, queued QoS 1 bytes hold one window of blocks (what a
# device asks for at once) and in-flight bytes four blocks (the rest of a window waits
# in the queue, stored once; an in-flight packet is also held serialized per connection,
# so a connection that never reads costs ~2x its in-flight bytes): an offline or stuck
# session holds ~1-1.5 windows whatever its owner publishes, and at most
# ``MAX_QUEUED_MESSAGES`` messages whatever their properties. No QoS 0 message is queued
# for an offline session (``queue_qos0_messages false``, mosquitto's default, written so
# that no later line turns it on): the bridge's answers are QoS 0, so a parked session is
# re-sent nothing when it is resumed. Sessions that ask never to
# expire expire after ``SESSION_EXPIRY`` (modelward clients use clean sessions).
_DEVICE = MqttConfig(host="", port=0, fleet="", client_name="")  # a device's defaults
BLOCK_SIZE = _DEVICE.block_size
MAX_PACKET = _DEVICE.packet_limit()
WINDOW = _DEVICE.window
MAX_INFLIGHT_BYTES = 4 * MAX_PACKET
MAX_QUEUED_BYTES = WINDOW * MAX_PACKET
# The count bounds what the byte bound misses. mosquitto counts queued payload bytes
# only, not properties (~60 bytes of broker memory each: 4096 queued messages of 1 MiB
# of properties were ~49 GiB), and for a *connected* client it holds QoS 0 packets (the
# bridge's answers: ``publisher._bridge.ANSWER_QOS``) by their count alone
# (``max_queued_messages`` against the connection's outgoing packets; the byte bounds
# apply to QoS 1 only). So the count is one window of answers (16) plus 8 for what else
# a connection is sent meanwhile (PUBACKs of its requests, a refusal, a PINGRESP, an
# announcement): ~24 MiB for a fetcher that never reads, whatever the fleet's size.
# ``fleet status`` asks for the retained statuses in batches of at most
# :data:`STATUS_BATCH` topics (``publisher._fleet.collect_reports``), each in flight at
# once (64 messages, 4 MiB), so it never needs more.
MAX_QUEUED_MESSAGES = WINDOW + 8
# Topics ``fleet status`` subscribes at once (their retained reports, up to 64 KiB each:
# 1 MiB, inside ``max_inflight_bytes`` and the client's receive maximum of 64).
STATUS_BATCH = WINDOW
SESSION_EXPIRY = "1h"
MAX_KEEPALIVE = 300
BROKER_SETTINGS = f"""\
allow_anonymous false
per_listener_settings false
set_tcp_nodelay true
max_packet_size {MAX_PACKET}
max_inflight_messages 64
max_inflight_bytes {MAX_INFLIGHT_BYTES}
max_queued_messages {MAX_QUEUED_MESSAGES}
max_queued_bytes {MAX_QUEUED_BYTES}
queue_qos0_messages false
persistent_client_expiration {SESSION_EXPIRY}
max_keepalive {MAX_KEEPALIVE}
"""


# Where Debian/Ubuntu (/usr/lib/<multiarch>/), Fedora (/usr/lib64/) and a source build
# (/usr/local/lib/) install mosquitto's bundled plugin.
PLUGIN_NAME = "mosquitto_dynamic_security.so"
_PLUGIN_GLOBS = ("/usr/lib/*/" + PLUGIN_NAME, "/usr/lib/" + PLUGIN_NAME,
                 "/usr/lib64/" + PLUGIN_NAME, "/usr/local/lib/" + PLUGIN_NAME,
                 "/usr/local/lib/*/" + PLUGIN_NAME)


def find_dynsec_plugin(given: Path | None = None) -> Path:
    """mosquitto's dynamic-security plugin: ``given``, or the one installed here.

    Raises:
        OperatorInputError: ``given`` is no file, or no plugin is installed.
    """
    if given is not None:
        if not given.is_file():
            raise OperatorInputError(f"--dynsec-plugin {given}: no such file",
                                     hint=f"the path of {PLUGIN_NAME} on the broker host")
        return given
    for pattern in _PLUGIN_GLOBS:
        found = sorted(Path("/").glob(pattern.lstrip("/")))
        if found:
            return found[0]
    raise OperatorInputError(
        f"mosquitto's dynamic-security plugin ({PLUGIN_NAME}) is not installed here",
        hint="install mosquitto 2.0 (Debian: apt-get install mosquitto), or pass "
             "--dynsec-plugin PATH (its path on the broker host)")


def settings_text(dynsec: Path, plugin: Path) -> str:
    """A mosquitto configuration fragment with the settings modelward relies on (the
    same for any fleet size), authenticating and authorising every client with the
    dynamic-security ``plugin`` and its ``dynsec`` JSON file."""
    return ("# modelward broker settings (generated by `modelward fleet broker-config`);\n"
            "# include it from mosquitto.conf, next to your TLS listener.\n"
            + BROKER_SETTINGS + f"plugin {plugin}\nplugin_opt_config_file {dynsec}\n")


@dataclass(frozen=True)
class BrokerConfig:
    """Files written by :func:`write_broker_config`, and what changed in them."""

    dynsec: Path
    conf: Path
    credentials: dict[str, Path]
    created: list[str] = field(default_factory=list)  # identities new to this directory
    kept: list[str] = field(default_factory=list)  # their existing password kept
    rotated: list[str] = field(default_factory=list)  # a new password, by request
    removed: list[str] = field(default_factory=list)  # no longer listed: file deleted
    dynsec_group: str | None = None  # the group that may read ``dynsec`` (mode 0640)
    note: str | None = None  # what the operator must still do for the broker to read it


# Files of the mosquitto password_file/acl_file configuration written before dynsec: a
# stale copy next to the new one would be a second, unchecked truth.
OLD_FILES = ("acl", "passwords")
FORMATS = ("mosquitto", "emqx")  # what ``fleet broker-config --format`` writes
# The group a packaged mosquitto drops to (Debian, Ubuntu, Fedora: user and group
# ``mosquitto``); dynamic-security.json is given to it when it exists (0640 root:GROUP).
DEFAULT_BROKER_GROUP = "mosquitto"
# A credential file as broker-config writes it: one secrets.token_urlsafe(24) and "\n".
_CREDENTIAL = re.compile(rb"[A-Za-z0-9_-]{32}\n")
_MAX_CREDENTIAL = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def _read_credential(dfd: int, where: Path, user: str) -> str | None:
    """The password in ``credentials/<user>`` (None: no such file), read as untrusted
    input: never through a link, a regular file, at most :data:`_MAX_CREDENTIAL` bytes,
    exactly the format broker-config writes.

    Raises:
        OperatorInputError: the file is anything else (naming it).
    """
    path = where / user
    hint = (f"remove {path} (a new password is made) or pass --rotate {user}; "
            "then install the new credential on that device or host")
    try:
        fd = os.open(user, _FILE_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as e:
        what = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be read ({e})"
        raise OperatorInputError(f"credential file {path} {what}", hint=hint) from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OperatorInputError(f"credential file {path} is not a regular file",
                                     hint=hint)
        data = os.read(fd, _MAX_CREDENTIAL + 1)
    finally:
        os.close(fd)
    if not _CREDENTIAL.fullmatch(data):
        raise OperatorInputError(
            f"credential file {path} is not one broker-config wrote (one line of 32 "
            "URL-safe base64 characters)", hint=hint)
    return data[:-1].decode()


def _existing(out: Path, users: list[str], rotate: set[str]
              ) -> tuple[dict[str, str], set[str], list[str]]:
    """The kept passwords of ``users`` (those with a credential file in ``out``, less
    ``rotate``), those of ``rotate`` that had one, and the files of identities no longer
    listed (ids only: nothing else in the directory is broker-config's)."""
    creds = out / "credentials"
    try:
        dfd = os.open(creds, _DIR_FLAGS)
    except FileNotFoundError:
        return {}, set(), []
    except OSError as e:
        raise OperatorInputError(f"{creds} is no directory broker-config wrote ({e})",
                                 hint="remove it, or choose another --output") from e
    try:
        kept, replaced = {}, set()
        for u in users:
            if u in rotate:  # whatever the file is, it is replaced, never read
                if _lexists(dfd, u):
                    replaced.add(u)
                continue
            pw = _read_credential(dfd, creds, u)
            if pw is not None:
                kept[u] = pw
        listed = {u.lower() for u in users}
        gone = []
        for name in sorted(os.listdir(dfd)):
            if not _ID.fullmatch(name) or name.lower() in listed:
                continue
            mode = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode
            if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                gone.append(name)
        return kept, replaced, gone
    finally:
        os.close(dfd)


def _lexists(dfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _broker_gid(group: str | None) -> tuple[int | None, str | None]:
    """The gid and name of the group that may read dynamic-security.json: ``group``, or
    :data:`DEFAULT_BROKER_GROUP` if it exists here and this process may give files to it
    (root, or a member); (None, None) otherwise.

    Raises:
        OperatorInputError: ``group`` is given but unknown, or may not be given.
    """
    name = group if group is not None else DEFAULT_BROKER_GROUP
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        if group is None:
            return None, None
        raise OperatorInputError(f"--broker-group {group}: no such group here",
                                 hint="the group mosquitto runs as (Debian: mosquitto)"
                                 ) from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        if group is None:
            return None, None
        raise OperatorInputError(
            f"--broker-group {group}: only root or a member of {group} may give it a file",
            hint="run broker-config as root (sudo)")
    return gid, name


def _unreadable_note(dynsec: Path) -> str:
    try:
        grp.getgrnam(DEFAULT_BROKER_GROUP)
        group = DEFAULT_BROKER_GROUP
    except KeyError:
        group = "<the broker's group>"
    return (f"{dynsec} is 0600, readable only by you: unless mosquitto runs as you, run "
            f"`sudo chown root:{group} {dynsec} && sudo chmod 0640 {dynsec}` "
            "(or rerun broker-config as root, with --broker-group GROUP)")


def write_broker_config(fleet: str, devices: list[str], out: Path,
                        plugin: Path | None = None,
                        iterations: int = DYNSEC_ITERATIONS,
                        rotate: bool | Collection[str] = False,
                        broker_group: str | None = None,
                        fmt: str = "mosquitto") -> BrokerConfig:
    """Write ``dynamic-security.json``, ``modelward.conf`` (the broker settings
    modelward relies on, :data:`BROKER_SETTINGS`, and the plugin lines) and one
    ``credentials/<user>`` file per identity; remove :data:`OLD_FILES`.

    Each identity keeps the password of its existing ``credentials/<user>`` file in
    ``out`` (a rerun that adds a device strands none already installed), unless named
    in ``rotate`` (True: every identity); new identities get a random one, and the files
    of identities no longer listed are deleted. Each plaintext goes only into its own
    0600 credential file, to be installed on that device (or the bridge/operator host).
    A device's listener and fetcher identities share its password.

    ``dynamic-security.json`` is mode 0640, group ``broker_group`` (default
    :data:`DEFAULT_BROKER_GROUP` when it exists and may be given), so a broker that drops
    privileges to that group's user can read it; else 0600 and :attr:`BrokerConfig.note`
    says what to run.

    ``fmt`` ``"emqx"``: the same identities, passwords and ACL for an EMQX 5 cluster in
    ``emqx/`` instead (:mod:`modelward.publisher._broker_emqx`; no plugin is looked
    for, :attr:`BrokerConfig.dynsec` is its ``users.json``, ``conf`` its settings).

    Raises:
        OperatorInputError: a bad or duplicate id (also one differing only in case), a
            device id that collides with a service user, a ``rotate`` name that is no
            identity, an existing credential file that is not broker-config's, an
            unknown ``broker_group``, or no dynamic-security plugin
            (:func:`find_dynsec_plugin`). Nothing is written then.
    """
    fleet = check_id("fleet", fleet)
    users = [check_id("device id", d) for d in devices]
    if {BRIDGE_USER, OPERATOR_USER} & set(users):
        raise OperatorInputError(f"device ids may not be {BRIDGE_USER} or {OPERATOR_USER}")
    identities = [BRIDGE_USER, OPERATOR_USER, *users]
    check_distinct(identities)
    if rotate is True:
        rotating = set(identities)
    elif rotate is False:
        rotating = set()
    else:
        rotating = {check_id("--rotate user", u) for u in rotate}
        unknown = sorted(rotating - set(identities))
        if unknown:
            raise OperatorInputError(
                f"--rotate {','.join(unknown)}: no such identity in this fleet",
                hint=f"one of {BRIDGE_USER}, {OPERATOR_USER} or a listed device id")
    if not 1 <= iterations <= 10_000_000:
        raise OperatorInputError(f"PBKDF2 iterations must be 1 to 10000000, not {iterations}")
    if fmt not in FORMATS:
        raise OperatorInputError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    if fmt == "mosquitto":
        plugin = find_dynsec_plugin(plugin)
    gid, group = _broker_gid(broker_group)
    kept, replaced, gone = _existing(out, identities, rotating)
    out.mkdir(parents=True, exist_ok=True)
    creds_dir = out / "credentials"
    creds_dir.mkdir(exist_ok=True, mode=0o700)
    passwords: dict[str, str] = {}
    creds: dict[str, Path] = {}
    created: list[str] = []
    rotated: list[str] = []
    for user in identities:
        creds[user] = creds_dir / user
        if user in kept:
            passwords[user] = kept[user]
            continue
        passwords[user] = _new_password()
        write_atomic(creds[user], passwords[user].encode() + b"\n", mode=0o600)
        (rotated if user in replaced else created).append(user)
    if fmt == "emqx":
        from modelward.publisher import _broker_emqx as emqx

        (out / "emqx").mkdir(exist_ok=True, mode=0o750)
        for name, data in emqx.documents(fleet, users, passwords, iterations).items():
            write_atomic(out / "emqx" / name, data, mode=0o600 if name == emqx.USERS_FILE
                         else 0o644)
        for name in gone:
            (creds_dir / name).unlink(missing_ok=True)
        return BrokerConfig(out / "emqx" / emqx.USERS_FILE, out / "emqx" / emqx.SETTINGS_FILE,
                            creds, created=created, kept=list(kept), rotated=rotated,
                            removed=gone)
    assert plugin is not None
    dynsec = out / DYNSEC_FILE
    doc = (json.dumps(dynsec_document(fleet, passwords, iterations), indent=1) + "\n")
    write_atomic(dynsec, doc.encode(), mode=0o600 if gid is None else 0o640, gid=gid)
    conf = out / "modelward.conf"
    write_atomic(conf, settings_text(dynsec.resolve(), plugin).encode())
    for name in OLD_FILES:
        (out / name).unlink(missing_ok=True)
    for name in gone:
        (creds_dir / name).unlink(missing_ok=True)
    return BrokerConfig(dynsec, conf, creds, created=created, kept=list(kept),
                        rotated=rotated, removed=gone, dynsec_group=group,
                        note=None if gid is not None else _unreadable_note(dynsec))
