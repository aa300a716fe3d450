"""``fleet broker-config --format emqx``: the same identities and ACL for an EMQX 5 cluster.

What mosquitto's dynamic security holds (:func:`~modelward.publisher._broker_config.roles`,
the one source of the ACL) is written as the three things an EMQX 5 cluster takes:

* ``users.json``: the password-based built-in database's users, in the file format of
  its ``import_users`` API (``user_id``, ``password_hash``, ``salt``, ``is_superuser``):
  PBKDF2-HMAC-SHA512, 64 bytes, hex, with the salt string as given (EMQX hashes the salt
  field's bytes; here a random 24-hex-digit string). The same passwords as the
  mosquitto credentials: a device's credential file works with either broker.
* ``authz-rules.json``: the built-in database authorizer's rules per username (the body
  of ``POST /api/v5/authorization/sources/built_in_database/rules/users``): each
  dynamic-security ``publishClientSend`` is a ``publish`` rule, each ``subscribe*`` a
  ``subscribe`` rule (EMQX checks no delivery: a client receives only what its allowed
  subscriptions match), with ``no_match = deny`` in the settings.
* ``modelward.hocon``: authentication and authorization as above, and the byte bounds of
  docs/brokers.md "EMQX 5" (packet size, queue, in-flight, retained size, session expiry).

Shared subscriptions: the bridges' rules allow ``$share/+/<fleet>/repo/req/+`` and the
topic itself, so they pass whether an EMQX version checks the filter as given or with
its ``$share/<group>/`` prefix stripped; a device has no rule for any request topic, so
it is denied either way.

Not emitted (EMQX's built-in database binds no client id to a user): that a credential
holds one session, which mosquitto's dynamic security enforces. docs/brokers.md says
what that leaves open and how to add it.
"""

from __future__ import annotations

import hashlib
import json
import os

from modelward.publisher._broker_config import (
    BRIDGE_USER,
    MAX_KEEPALIVE,
    MAX_PACKET,
    MAX_QUEUED_MESSAGES,
    OPERATOR_USER,
    SESSION_EXPIRY,
    WINDOW,
    fetch_role,
    listen_role,
    roles,
)
from modelward.updater._config import fetch_username

USERS_FILE = "users.json"
RULES_FILE = "authz-rules.json"
SETTINGS_FILE = "modelward.hocon"
RETAINED_MAX = 64 * 1024  # a status report or an announcement (64 KiB each at most)


def _password_hash(password: str, salt: str, iterations: int) -> str:
    return hashlib.pbkdf2_hmac("sha512", password.encode(), salt.encode(), iterations,
                               64).hex()


def users(passwords: dict[str, str], iterations: int) -> list[dict[str, object]]:
    """The built-in database users: the bridge, the operator, and each device's listener
    (``<id>``) and fetcher (``<id>:fetch``), which share the device's password."""
    out: list[dict[str, object]] = []
    for ident, password in passwords.items():
        names = [ident] if ident in (BRIDGE_USER, OPERATOR_USER) else \
            [ident, fetch_username(ident)]
        for name in names:
            salt = os.urandom(12).hex()
            out.append({"user_id": name, "password_hash": _password_hash(
                password, salt, iterations), "salt": salt, "is_superuser": False})
    return out


def authz_rules(fleet: str, devices: list[str]) -> list[dict[str, object]]:
    """Each username's rules, from the dynamic-security roles."""
    usernames = {BRIDGE_USER: BRIDGE_USER, OPERATOR_USER: OPERATOR_USER}
    for d in devices:
        usernames[listen_role(d)] = d
        usernames[fetch_role(d)] = fetch_username(d)
    out: list[dict[str, object]] = []
    for role in roles(fleet, devices):
        rules: list[dict[str, object]] = []
        for acl in role["acls"]:  # type: ignore[attr-defined]
            kind = str(acl["acltype"])
            action = ("publish" if kind == "publishClientSend" else
                      "subscribe" if kind.startswith("subscribe") else None)
            if action is not None:
                rules.append({"action": action, "permission": "allow",
                              "topic": acl["topic"]})
        out.append({"username": usernames[str(role["rolename"])], "rules": rules})
    return out


def settings(iterations: int) -> str:
    """The HOCON fragment for ``emqx.conf`` (or ``base.hocon``)."""
    return f"""\
# modelward: written by `modelward fleet broker-config --format emqx`
# (docs/brokers.md "EMQX 5"). Import users.json and authz-rules.json once EMQX runs:
#   curl -u KEY:SECRET -F filename=@users.json \\
#     https://HOST:18083/api/v5/authentication/password_based%3Abuilt_in_database/import_users
#   curl -u KEY:SECRET -H 'Content-Type: application/json' -d @authz-rules.json \\
#     https://HOST:18083/api/v5/authorization/sources/built_in_database/rules/users
authentication = [
  {{
    mechanism = password_based
    backend = built_in_database
    user_id_type = username
    password_hash_algorithm {{
      name = pbkdf2
      mac_fun = sha512
      iterations = {iterations}
      dk_length = 64
    }}
  }}
]
authorization {{
  no_match = deny
  deny_action = ignore
  cache {{ enable = true }}
  sources = [
    {{ type = built_in_database, enable = true }}
  ]
}}
mqtt {{
  max_packet_size = {MAX_PACKET}B
  max_inflight = {WINDOW}
  max_mqueue_len = {MAX_QUEUED_MESSAGES}
  mqueue_store_qos0 = false
  session_expiry_interval = {SESSION_EXPIRY}
  server_keepalive = {MAX_KEEPALIVE}
  max_subscriptions = 8
}}
retainer {{
  max_payload_size = {RETAINED_MAX // 1024}KB
}}
force_shutdown {{
  enable = true
  max_heap_size = 64MB
  max_mailbox_size = 1000
}}
"""


def documents(fleet: str, devices: list[str], passwords: dict[str, str],
              iterations: int) -> dict[str, bytes]:
    """File name -> contents of the ``emqx/`` directory."""
    return {
        USERS_FILE: (json.dumps(users(passwords, iterations), indent=1) + "\n").encode(),
        RULES_FILE: (json.dumps(authz_rules(fleet, devices), indent=1) + "\n").encode(),
        SETTINGS_FILE: settings(iterations).encode(),
    }
