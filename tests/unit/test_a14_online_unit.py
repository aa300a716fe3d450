"""The refresh unit (systemd/modelward-repo-refresh.service) as a local user or a careless
operator meets it: what its file-system view still shows, and what bounds its run. Read
through tests/_i14_online_unit.py's model of the unit's directives."""

from __future__ import annotations

from tests._i14_online_unit import directives, view


def test_removable_media_keys_are_out_of_the_units_view() -> None:
    d = directives()
    assert view("/run/media/operator/KEYS/root.pem", d) == "hidden"


def test_refresh_unit_bounds_its_run_time_and_memory() -> None:
    d = directives()
    assert d.get("TimeoutStartSec") not in (None, ["infinity"], ["0"])
    assert d.get("MemoryMax")


def test_refresh_unit_view_of_the_usual_key_places() -> None:
    """What the code resists: KEYS where the README says to keep it is not in view; the
    online directory is read-only and only metadata/ is writable."""
    d = directives()
    for p in ("/var/lib/modelward-keys/root.pem", "/root/keys/root.pem",
              "/home/op/keys/root.pem", "/etc/modelward/keys/root.pem",
              "/etc/credstore/modelward-key-passphrase-root", "/srv/modelward/keys/x",
              "/media/op/KEYS/root.pem", "/mnt/usb/root.pem", "/opt/keys/root.pem"):
        assert view(p, d) == "hidden", p
    assert view("/var/lib/modelward-online/snapshot.pem", d) == "ro"
    assert view("/srv/modelward/metadata/timestamp.json", d) == "rw"
    assert view("/srv/modelward/targets/x", d) == "hidden"
