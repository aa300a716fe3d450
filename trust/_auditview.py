"""How an audit history is shown (``fleet audit``, ``agent audit``): pure; every string
from the device escaped, as it is hostile even when signed."""

from __future__ import annotations

import json
from typing import Any

from modelward.trust._auditchain import AuditHistory
from modelward.trust._display import escape, escape_ascii


def history_json(device: str, h: AuditHistory) -> dict[str, Any]:
    """The history as strict JSON (device strings kept as they are: JSON escapes them)."""
    return {"device": device, "verified": True,
            "dropped": {"count": h.dropped_count, "head_hash": h.dropped_head_hash,
                        "checkpoint_time": h.checkpoint_time},
            "head": h.head.to_json(), "signed_through": h.signed, "unsigned": h.unsigned,
            "entries": [{"seq": e.seq, "time": e.time, "kind": e.kind, "fields": e.fields,
                         "hash": e.hash} for e in h.entries]}


def format_history(device: str, h: AuditHistory) -> str:
    """One line per entry, every device string escaped (it is hostile even when signed)."""
    out = [f"audit log of {device}: verified, head seq {h.head.seq} ({h.head.hash[:16]}...)"]
    if h.dropped_count:
        out.append(f"  {h.dropped_count} earlier entries dropped at the checkpoint of "
                   f"{escape(h.checkpoint_time, 40)}: verifiable as a count and the hash "
                   f"{h.dropped_head_hash}")
    for e in h.entries:
        fields = " ".join(f"{escape_ascii(k, 32)}={escape_ascii(v, 80)}"
                          for k, v in sorted(e.fields.items()))
        out.append(f"  {e.seq:>8} {escape(e.time, 40)} {escape(e.kind, 24)} {fields}")
    if h.unsigned:
        out.append(f"  WARNING: the last {h.unsigned} entries come after the signed head "
                   f"(seq {h.signed}): no signed report vouches for them yet")
    return "\n".join(out)


def history_text(device: str, h: AuditHistory, as_json: bool) -> str:
    """What ``fleet audit`` prints."""
    return json.dumps(history_json(device, h)) if as_json else format_history(device, h)
