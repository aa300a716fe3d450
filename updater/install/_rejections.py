"""Remembered rejections: a signed release that failed on this device is not tried again.

A *release* here is a TUF target path together with its signed hashes. When an attempt
that chose a release fails on the release itself, the release is remembered, and later
attempts skip it until signed metadata changes it: another target path, or other hashes
for that path. "The release itself" means bytes that matched the signed hashes and then
failed: a malformed bundle (:class:`~modelward.updater.errors.BundleFormatError`), a fingerprint
that differs from the signed one (:class:`~modelward.updater.errors.FingerprintMismatchError`) or
a failed health check (:class:`~modelward.updater.errors.HealthCheckError`). Trying those bytes
again gives the same answer. (This holds because nothing left on disk from an earlier
attempt reaches the fingerprint or the health check unverified, issue 13 "verify what
you use": otherwise a disk attacker could plant files that fail, and reject a good
release.)

What is *not* a rejection, and only backs off (``modelward.agent._schedule``):

* transport errors (origin or broker down, timeouts): the release may be fine;
* a hash or length mismatch (:class:`~modelward.updater.errors.TargetHashError`): the bytes were
  not the signed ones, so it says nothing about the release. The origin, the broker,
  the link or this device's own partial download (``staging``, on a disk an attacker may
  write) is at fault, and may recover: remembering it would let a disk attacker, or an
  origin for a moment, turn a good release into a rejected one. The daemon's backoff,
  which announcements no longer cut short, bounds what a bad origin costs.

An entry also expires after :data:`RELEASE_TTL` (a health check that timed out on a
loaded device gets one more try a day later, and that is all a bad release costs).

The file ``state_dir/rejections.json`` is MACed by the TPM (the trust record's key,
through ``TpmInterface.mac``, over a digest with its own domain), written atomically,
bounded to :data:`MAX_ENTRIES` entries (oldest dropped) and :data:`MAX_FILE_BYTES`,
opened without following symlinks and parsed strictly. What the disk attacker can do:

* delete or garble the file: the MAC fails, it counts as empty, and each rejected
  release is tried once more (that is all);
* plant an entry for a good release (to hold the device back): impossible without the
  TPM's MAC;
* put back an older MACed copy: it can only name releases that really failed on this
  device, and every entry still expires at the time it was MACed with.

With more failing releases signed at once than :data:`MAX_ENTRIES`, the oldest
rejection is dropped and tried again; every such attempt fails, so the daemon's backoff
(up to the poll interval) is what bounds the cost then.

An entry of reason :data:`DELTA_REFUSED` refuses a release's *delta*, not the release:
its chunk index lied (the assembled files failed the seal), or the origin refused, garbled
or altered its ranges. Later attempts take that release's whole bundle directly instead of
paying for the delta and then the whole bundle at every poll (the release itself stays a
candidate). The disk attacker cannot plant one (the MAC); an origin or broker that forges
a refusal makes the device take the whole bundle of that release for a day, once per
release: no more than refusing every range costs anyway.

The rules are pure functions over (rejections, candidates, now); :class:`RejectionStore`
is the thin I/O around them (house style 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from modelward.trust._atomic import write_atomic
from modelward.trust._bounded import UnsafeFileError, loads_bounded
from modelward.trust._bounded import read_bounded as read_bounded_file
from modelward.trust.errors import LocalDeviceError, ModelwardError
from modelward.updater.errors import (
    BundleFormatError,
    EncryptionRefusedError,
    FingerprintMismatchError,
    HealthCheckError,
    ProvenanceRefusedError,
)
from modelward.updater.rollout import Choice, Release, choose_release

logger = logging.getLogger(__name__)

FILE_NAME = "rejections.json"
MAX_ENTRIES = 32  # releases remembered; the oldest is dropped beyond
MAX_FILE_BYTES = 64 * 1024  # bytes; 32 entries of usual paths need about 25 KiB
MAX_DETAIL = 300  # characters of the error message kept per entry
RELEASE_TTL = 24 * 3600.0  # seconds a release that failed stays rejected at most
_MAC_DOMAIN = b"modelward rejections v1\n"
#: The reason of an entry that refuses the release's delta only (module docstring).
DELTA_REFUSED = "DeltaRefused"
#: ... and of one that counts its delta's transfers that failed before a chunk came
#: (the count leads its detail: ``"2: ..."``).
DELTA_STALLED = "DeltaStalled"
# Failures of bytes that matched their signed hashes: properties of the release itself.
REJECTING = (BundleFormatError, FingerprintMismatchError, HealthCheckError,
             ProvenanceRefusedError, EncryptionRefusedError)


class RejectionsFileError(LocalDeviceError):
    """``rejections.json`` is unreadable, oversized, malformed or its MAC does not verify.

    Attributes:
        path: the file at fault.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class SignedTarget(Protocol):
    """What a rejection needs of a TUF target."""

    @property
    def path(self) -> str: ...
    @property
    def hashes(self) -> Mapping[str, str]: ...


class Rejectable(Release, Protocol):
    """A candidate release: its signed target and its selection fields."""

    @property
    def target(self) -> SignedTarget: ...


R = TypeVar("R", bound=Rejectable)


def _hashes(target: SignedTarget) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in target.hashes.items()))


@dataclass(frozen=True)
class Rejection:
    """One remembered release and why it was refused.

    Attributes:
        path: the TUF target path.
        hashes: its signed hashes, sorted (algorithm, hex digest).
        reason: the error class, e.g. ``HealthCheckError``.
        detail: the error message (shortened).
        model, version: what the signed fields called it.
        at: when it was refused (Unix time).
        until: when it may be tried again at the latest (Unix time).
    """

    path: str
    hashes: tuple[tuple[str, str], ...]
    reason: str
    detail: str
    model: str
    version: str
    at: float
    until: float

    def matches(self, target: SignedTarget) -> bool:
        """Whether ``target`` is this very release: same path, same signed hashes."""
        return target.path == self.path and _hashes(target) == self.hashes

    @property
    def refuses_release(self) -> bool:
        """Whether it refuses the release (else only its delta, :data:`DELTA_REFUSED`)."""
        return self.reason not in (DELTA_REFUSED, DELTA_STALLED)

    def live(self, now: float) -> bool:
        """Still in force at ``now``. A time before ``at`` (a clock set back) ends it."""
        return self.at <= now < self.until

    def to_json(self) -> dict[str, Any]:
        """The entry's fields, as stored."""
        return {"path": self.path, "hashes": dict(self.hashes), "reason": self.reason,
                "detail": self.detail, "model": self.model, "version": self.version,
                "at": self.at, "until": self.until}

    @classmethod
    def from_json(cls, d: object) -> Rejection:
        """Parse one stored entry strictly.

        Raises:
            ValueError: not exactly the fields :meth:`to_json` writes, with their types.
        """
        if not isinstance(d, dict) or set(d) != {"path", "hashes", "reason", "detail", "model",
                                                 "version", "at", "until"}:
            raise ValueError("an entry must have exactly the stored fields")
        strs = ("path", "reason", "detail", "model", "version")
        if not all(isinstance(d[k], str) for k in strs):
            raise ValueError(f"{strs} must be strings")
        if not all(isinstance(d[k], int | float) and not isinstance(d[k], bool)
                   for k in ("at", "until")):
            raise ValueError("at and until must be numbers")
        h = d["hashes"]
        if not isinstance(h, dict) or not h or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in h.items()):
            raise ValueError("hashes must be a non-empty object of strings")
        return cls(d["path"], tuple(sorted(h.items())), d["reason"],
                   d["detail"][:MAX_DETAIL], d["model"], d["version"], float(d["at"]),
                   float(d["until"]))


# --- the rules (pure) ------------------------------------------------------------------


def rejection_for(
    target: SignedTarget, model: str, version: str, error: BaseException, now: float,
) -> Rejection | None:
    """The rejection an attempt's failure on ``target`` earns, or None.

    Only a failure of the verified release itself rejects (:data:`REJECTING`): a hash
    mismatch, a transport or local error, an interruption or a bug says nothing about
    the release (module docstring).
    """
    if not isinstance(error, REJECTING):
        return None
    detail = "".join(c if c.isprintable() else "?" for c in str(error)[:MAX_DETAIL])
    return Rejection(target.path, _hashes(target), type(error).__name__, detail, model,
                     version, now, now + RELEASE_TTL)


def add(rejections: Sequence[Rejection], new: Rejection,
        max_entries: int = MAX_ENTRIES) -> tuple[Rejection, ...]:
    """``rejections`` with ``new`` (replacing an entry for the same release), bounded."""
    kept = [r for r in rejections if (r.path, r.hashes, r.refuses_release) !=
            (new.path, new.hashes, new.refuses_release)]
    kept.append(new)
    kept.sort(key=lambda r: r.at)
    return tuple(kept[-max_entries:])


def prune(rejections: Sequence[Rejection], targets: Iterable[SignedTarget],
          now: float) -> tuple[Rejection, ...]:
    """The entries still in force: not expired, and the metadata still signs that release.

    Once the verified metadata no longer lists a path with those hashes, the entry has
    done its work: new signed metadata changed the release.
    """
    signed = [(t.path, _hashes(t)) for t in targets]
    return tuple(r for r in rejections if r.live(now) and (r.path, r.hashes) in signed)


def rejected(rejections: Sequence[Rejection], target: SignedTarget,
             now: float) -> Rejection | None:
    """The entry in force that refuses ``target``, or None."""
    return next((r for r in rejections
                 if r.refuses_release and r.live(now) and r.matches(target)), None)


def delta_refused(rejections: Sequence[Rejection], target: SignedTarget,
                  now: float) -> Rejection | None:
    """The entry in force that refuses ``target``'s delta, or None."""
    return next((r for r in rejections
                 if r.reason == DELTA_REFUSED and r.live(now) and r.matches(target)), None)


def delta_stalls(rejections: Sequence[Rejection], target: SignedTarget, now: float) -> int:
    """How many attempts in a row ``target``'s delta failed before a chunk came."""
    r = next((r for r in rejections
              if r.reason == DELTA_STALLED and r.live(now) and r.matches(target)), None)
    if r is None:
        return 0
    head = r.detail.partition(":")[0]
    return int(head) if head.isdigit() and len(head) < 4 else 0


def choose_not_rejected(
    candidates: Sequence[R], rejections: Sequence[Rejection], device_id: str, channel: str,
    now: float,
) -> tuple[Choice | None, Rejection | None]:
    """:func:`choose_release` over the candidates this device has not rejected.

    A rejected release is skipped, and the next eligible one may be chosen; except a
    pin: the operator's pin says "run this one", so when the pinned release is rejected
    the device keeps what it runs rather than follow the rollout rules the pin overrides.

    Returns:
        The choice (None: nothing to install), and the rejection that held back the
        release that would have been chosen without it (for messages), or None.
    """
    first = choose_release(candidates, device_id, channel)
    if first is None:
        return None, None
    chosen = next(c for c in candidates if c is first.release)
    hit = rejected(rejections, chosen.target, now)
    if hit is None:
        return first, None
    if first.pinned:
        return None, hit
    usable = [c for c in candidates if rejected(rejections, c.target, now) is None]
    return choose_release(usable, device_id, channel), hit


# --- the file (thin I/O) ---------------------------------------------------------------


def digest(rejections: Sequence[Rejection]) -> bytes:
    """What the TPM MACs: a domain-separated hash of the canonical entries."""
    canonical = json.dumps([r.to_json() for r in rejections], sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(_MAC_DOMAIN + canonical.encode()).digest()


def encode(rejections: Sequence[Rejection], mac: bytes) -> bytes:
    """Serialise the entries with their MAC."""
    doc = {"version": 1, "rejections": [r.to_json() for r in rejections], "mac": mac.hex()}
    return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


def decode(data: bytes, path: str, mac_ok: Callable[[bytes, bytes], bool]
           ) -> tuple[Rejection, ...]:
    """Parse and authenticate a rejections file.

    Raises:
        RejectionsFileError: oversized, malformed, too many entries, or the MAC does not
            verify.
    """
    if len(data) > MAX_FILE_BYTES:
        raise RejectionsFileError(f"{path} is over {MAX_FILE_BYTES} bytes", path=path)
    try:
        doc = loads_bounded(data, max_bytes=MAX_FILE_BYTES, what=path)
        if not isinstance(doc, dict) or set(doc) != {"version", "rejections", "mac"}:
            raise ValueError("expected exactly version, rejections and mac")
        if doc["version"] != 1:
            raise ValueError(f"unknown version {doc['version']!r}")
        entries = doc["rejections"]
        if not isinstance(entries, list) or len(entries) > MAX_ENTRIES:
            raise ValueError(f"rejections must be a list of at most {MAX_ENTRIES}")
        out = tuple(Rejection.from_json(e) for e in entries)
        if not isinstance(doc["mac"], str):
            raise ValueError("mac must be a hex string")
        mac = bytes.fromhex(doc["mac"])
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        raise RejectionsFileError(f"{path} is malformed: {e}", path=path) from e
    if not mac_ok(digest(out), mac):
        raise RejectionsFileError(f"{path} was altered: its TPM MAC does not verify",
                                  path=path)
    return out


def read_bounded(path: Path, limit: int = MAX_FILE_BYTES) -> bytes | None:
    """The file's bytes (None if absent), opened without following links or blocking.

    Raises:
        RejectionsFileError: not a regular file, over ``limit`` bytes, or unreadable.
    """
    try:
        return read_bounded_file(path, limit)
    except UnsafeFileError as e:
        raise RejectionsFileError(str(e), path=str(path)) from e
    except OSError as e:
        raise RejectionsFileError(f"cannot read {path}: {e}", path=str(path)) from e


class _Mac(Protocol):
    def mac(self, digest: bytes) -> bytes: ...
    def mac_ok(self, digest: bytes, mac: bytes) -> bool: ...


class RejectionStore:
    """``state_dir/rejections.json``, MACed by the TPM.

    Args:
        state_dir: the agent's state directory.
        tpm: the device TPM (``mac``/``mac_ok``).
        clock: Unix time (injected in tests).
    """

    def __init__(self, state_dir: Path, tpm: _Mac,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = state_dir / FILE_NAME
        self._tpm = tpm
        self._clock = clock
        self._entries: tuple[Rejection, ...] | None = None

    def load(self) -> tuple[Rejection, ...]:
        """The stored entries (all, expired too).

        Raises:
            RejectionsFileError: the file cannot be believed.
            TpmError: the TPM failed.
        """
        data = read_bounded(self.path)
        return () if data is None else decode(data, str(self.path), self._tpm.mac_ok)

    def entries(self) -> tuple[Rejection, ...]:
        """The stored entries; a file that cannot be believed counts as empty (logged)."""
        if self._entries is None:
            try:
                self._entries = self.load()
            except ModelwardError as e:
                logger.warning("forgetting remembered rejections: %s", e,
                               extra={"error": type(e).__name__})
                self._entries = ()
        return self._entries

    def save(self, rejections: Sequence[Rejection]) -> None:
        """Replace the file atomically (removed when empty).

        Raises:
            OSError: the state directory cannot be written.
            TpmError: the TPM failed.
        """
        entries = tuple(rejections)
        while entries:
            data = encode(entries, self._tpm.mac(digest(entries)))
            if len(data) <= MAX_FILE_BYTES:  # (signed target paths have no length limit)
                write_atomic(self.path, data, 0o600)
                break
            entries = entries[1:]  # the oldest goes, as beyond MAX_ENTRIES
        else:
            self.path.unlink(missing_ok=True)
        self._entries = entries

    def choose(self, candidates: Sequence[R], device_id: str,
               channel: str) -> Choice | None:
        """Pick a release among ``candidates`` (the verified metadata's), skipping rejected
        ones; entries the metadata no longer signs are forgotten.
        """
        now = self._clock()
        old = self.entries()
        kept = prune(old, (c.target for c in candidates), now)
        if kept != old:
            self._save_logged(kept)
        choice, hit = choose_not_rejected(candidates, kept, device_id, channel, now)
        if hit is not None:
            logger.warning(
                "not trying %s %s again (target %s): rejected at %s for %s: %s",
                hit.model, hit.version, hit.path, _iso(hit.at), hit.reason, hit.detail,
                extra={"model": hit.model, "version": hit.version, "target": hit.path,
                       "reason": hit.reason, "retry_after": _iso(hit.until)},
            )
        return choice

    def note_failure(self, target: SignedTarget, model: str, version: str,
                     error: BaseException) -> None:
        """Remember ``target`` if ``error`` rejects it; never raises (the error matters)."""
        new = rejection_for(target, model, version, error, self._clock())
        if new is None:
            return
        logger.warning("remembering the rejection of %r %r (target %r): %s", model, version,
                       target.path, new.reason,
                       extra={"model": model, "version": version, "target": target.path,
                              "reason": new.reason})
        self._save_logged(add(self.entries(), new))

    def delta_refused(self, target: SignedTarget) -> Rejection | None:
        """The entry in force that refuses ``target``'s delta (take its whole bundle)."""
        return delta_refused(self.entries(), target, self._clock())

    def note_delta_refused(self, target: SignedTarget, model: str, version: str,
                           why: str) -> None:
        """Remember that ``target``'s delta was refused; never raises."""
        now = self._clock()
        detail = "".join(c if c.isprintable() else "?" for c in why[:MAX_DETAIL])
        logger.warning("remembering that the delta of %r %r (target %r) was refused: %s",
                       model, version, target.path, detail,
                       extra={"model": model, "version": version, "target": target.path,
                              "reason": DELTA_REFUSED})
        self._save_logged(add(self.entries(), Rejection(
            target.path, _hashes(target), DELTA_REFUSED, detail, model, version, now,
            now + RELEASE_TTL)))

    def delta_stalls(self, target: SignedTarget) -> int:
        """How many attempts in a row ``target``'s delta failed before a chunk came."""
        return delta_stalls(self.entries(), target, self._clock())

    def note_delta_stalls(self, target: SignedTarget, model: str, version: str, n: int,
                          why: str) -> None:
        """Store that count (0: forget it); never raises."""
        now = self._clock()
        kept = tuple(r for r in self.entries()
                     if not (r.reason == DELTA_STALLED and r.matches(target)))
        if n > 0:
            detail = "".join(c if c.isprintable() else "?" for c in f"{n}: {why}")
            kept = add(kept, Rejection(target.path, _hashes(target), DELTA_STALLED,
                                       detail[:MAX_DETAIL], model, version, now,
                                       now + RELEASE_TTL))
        self._save_logged(kept)

    def _save_logged(self, entries: Sequence[Rejection]) -> None:
        try:
            self.save(entries)
        except (OSError, ModelwardError) as e:
            logger.error("cannot write %s: %s", self.path, e)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

