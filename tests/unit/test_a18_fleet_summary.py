"""Attack a18 on issue 17's fleet view (``fleet status --summary``): one device signing
any report it likes with its own enrolled key, and a careless operator.

Every report here is signed with the device's key and goes through the real
``judge_fleet`` (signature against the enrolled key, the closed report schema, the
freshness judgement) before :func:`summarize`; the operator cases go through the real
``Repository`` and ``modelward.cli.main``. Each docstring says what was tried, what
happened, the cause and how it was fixed; the assertions say what should happen.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from modelward.publisher._fleet_summary import (
    MAX_ATTEMPTS_PER_DEVICE,
    MAX_SHOWN_REASONS,
    RolloutRelease,
    format_summary,
    summarize,
    summary_json,
)
from modelward.trust._report import MAX_SEQ
from modelward.trust._report_fields import MAX_REASONS
from modelward.updater.rollout import rollout_bucket
from tests.unit.test_i17_fleet_summary import _rep, _rows


def test_one_device_is_sixteen_devices_under_other(tmp_path: Path) -> None:
    """Tried: 64 honest devices fill the 32 shown reasons (2 devices each); one liar
    reports 16 reason names of its own (the schema's MAX_REASONS), 1 attempt each.

    Happened: ``failure_reasons.other`` says ``devices: 16`` (terminal: ``"other": 16,
    16``), all of it from one device: a forged count 16 times its share.

    Cause: ``summarize`` adds up ``devices[k]`` over every reason past the 32 shown (the
    code's comment: "devices is a sum of shares here"), so a device with n of the rest
    counts n times; the module doc says counts are of devices.

    Fixed: ``other`` counts the distinct devices naming any of the rest (each once).
    """
    reports: dict[str, Any] = {}
    for i in range(MAX_SHOWN_REASONS):
        for j in range(2):
            d = f"h{i:02}{j}"
            reports[d] = _rep(d, failure_reasons={f"Err{i:02}": 1})
    reports["liar"] = _rep("liar", failure_reasons={f"Z{j:02}": 1 for j in range(MAX_REASONS)})
    s = summarize(_rows(tmp_path, reports))
    fr = s["failure_reasons"]
    # unchanged by the liar: every honest reason is shown with its own 2 devices
    assert all(fr[f"Err{i:02}"] == {"devices": 2, "attempts": 2}
               for i in range(MAX_SHOWN_REASONS))
    assert fr["other"]["devices"] <= 1  # one device: one share


def test_one_device_hides_the_others_attempts(tmp_path: Path) -> None:
    """Tried: 10 honest devices count 5 ``FetchError`` attempts each; one liar reports
    ``FetchError: 2**53-1`` (the schema's bound).

    Happened: ``attempts`` is 2**53-1 with or without the honest devices: their 50
    attempts change nothing in the figure; one device sets it alone (and any value
    below the cap moves it by any amount).

    Cause: ``attempts`` is the sum of what devices say, capped at MAX_SEQ; one device's
    share of a sum is unbounded (the module doc's "counts are of devices, never sums of
    what a device says" is not true of this figure).

    Fixed: each device adds at most MAX_ATTEMPTS_PER_DEVICE (100) to a reason's attempts.
    """
    liar = {"liar": _rep("liar", failure_reasons={"FetchError": MAX_SEQ})}
    honest = {f"h{i}": _rep(f"h{i}", failure_reasons={"FetchError": 5}) for i in range(10)}
    alone = summarize(_rows(tmp_path / "alone", liar))["failure_reasons"]["FetchError"]
    both = summarize(_rows(tmp_path / "both", {**honest, **liar}))["failure_reasons"]
    assert both["FetchError"]["devices"] == 11  # (the count of devices is right)
    # the honest devices' 50 attempts must show in the figure
    assert both["FetchError"]["attempts"] != alone["attempts"]


def test_installed_counts_a_device_outside_the_rollout(tmp_path: Path) -> None:
    """Tried: a 30 % rollout of classifier 2.0.0 on ``stable``; one device whose enrolled
    id puts it outside the 30 % and that says it follows ``beta`` claims to run 2.0.0.

    Happened: the release's row reads ``eligible 5 / installed 1 / failed 0 of 19 on its
    model and channel``: the liar moved the rollout counts of a release it is not
    eligible for, and installed is not a subset of the devices the row is about.

    Cause: ``installed`` is every believed device whose ``active`` is that name and
    version: neither the channel nor the rollout position (from the enrolled id) is
    checked, unlike ``eligible`` and ``failed``.

    Fixed: ``installed`` is of the eligible devices; the rest that run it are ``outside``.
    """
    ids = [f"d{i:02}" for i in range(20)]
    out = next(d for d in ids if rollout_bucket(d, "classifier", "2.0.0") >= 30.0)
    reports = {d: _rep(d) for d in ids}
    rel = RolloutRelease("classifier", "2.0.0", "stable", 30.0)
    honest = summarize(_rows(tmp_path / "a", reports), [rel])["rollouts"][0]
    reports[out] = _rep(out, "2.0.0", channel="beta")
    [r] = summarize(_rows(tmp_path / "b", reports), [rel])["rollouts"]
    assert r["eligible"] == honest["eligible"]  # (unchanged: from the enrolled id)
    assert r["installed"] == honest["installed"] == 0


def test_negative_zero_duration_prints_negative(tmp_path: Path) -> None:
    """Tried: one device reports ``verify_s: -0.0`` and ``boot_check_s: -0.0``.

    Happened: the report is believed (schema range is "0 <= x"), and the summary says
    ``verify_s: p50 -0.000s, p95 -0.000s`` (JSON ``"p50": -0.0``): a negative duration.

    Cause: ``-0.0 >= 0`` is true, so ``_durations`` in ``_report_schema`` keeps the sign;
    ``summarize`` takes ``float(v)`` and ``_s`` formats it with its sign.

    Fixed: ``summarize`` takes ``float(v) + 0.0`` (a -0.0 sample is 0.0).
    """
    s = summarize(_rows(tmp_path, {"a": _rep("a", verify=-0.0, boot=-0.0)}))
    text = format_summary(s)
    assert s["believed"] == 1
    assert "-0.000s" not in text
    assert all(math.copysign(1.0, d["p50"]) > 0 for d in s["durations"].values())
    assert '"p50": -0.0' not in summary_json(s)


def test_lookalike_channel_is_a_second_stable(tmp_path: Path) -> None:
    """Tried: one device says it follows ``st\\u0430ble`` (Cyrillic a), next to honest
    ``stable`` devices.

    Happened: ``channels: "stable" 3, "stable" 1`` on the terminal (the second with the
    Cyrillic letter, unescaped): a row that reads as a forged second ``stable`` count;
    the same works for model names and versions (``versions:`` lines).

    Cause: ``_q`` uses :func:`escape` (controls, format characters, odd spaces) but not
    the enrolled-id alphabet that :func:`escape_id` applies to device ids for exactly this
    (``d\\u0435v-1`` vs ``dev-1``); the channel in the schema is any text of 256.

    Fixed: ``_q`` uses ``escape_ascii``: every non-ASCII character prints as its escape.
    """
    reports = {f"h{i}": _rep(f"h{i}") for i in range(3)}
    reports["liar"] = _rep("liar", channel="st\u0430ble")
    s = summarize(_rows(tmp_path, reports))
    assert s["channels"] == {"stable": 3, "st\u0430ble": 1}  # (exact in the figures)
    line = next(x for x in format_summary(s).splitlines() if x.startswith("channels: "))
    assert "\u0430" not in line  # the look-alike must not print as itself


def test_summary_with_keys_without_anchor_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Tried (careless operator, through ``modelward.cli.main``): ``fleet status --summary
    --repo R --keys K`` where K is an existing but wrong, empty directory (no devices
    enrolled: the broker is not asked).

    Happened: exit 0, the summary is printed, and K now holds ``trusted-root.json``: a
    copy of the root the repository *serves*, taken on first use and kept as the anchor
    (the log says "trusting .../metadata/1.root.json once, as found in the served
    directory"). A read-only view wrote into the operator's key directory, and would
    have believed any root the served directory held.

    Cause: ``repository_releases`` opens ``Repository(repo_dir, keys, ...)``, whose
    migration for repositories made before ``trusted-root.json`` existed adopts the
    served root when the anchor is missing; the fleet view does not check that ``--keys``
    holds an anchor (``existing_dir`` only) and says it is "verified from the root
    anchored in keys".

    Fixed: the CLI refuses a --keys without trusted-root.json, before the broker; the
    fleet view opens the repository with ``adopt_anchor = False`` (MissingAnchorError).
    """
    from modelward.publisher._keyfile import ScryptParams
    from modelward.publisher._repo import Repository
    from tests.conftest import PASSPHRASE
    from tests.unit.test_i15_mistakes import B, run_main

    monkeypatch.setenv("MODELWARD_KEY_PASSPHRASE", PASSPHRASE.decode())
    monkeypatch.setattr("modelward.publisher._keyfile.DEFAULT_SCRYPT",
                        ScryptParams(2**10, 8, 1))
    Repository(tmp_path / "repo", tmp_path / "keys", PASSPHRASE).init()
    wrong = tmp_path / "wrong-keys"
    wrong.mkdir()
    (tmp_path / "fd" / "devices").mkdir(parents=True)
    code, out, err = run_main(["fleet", "status", "--fleet-dir", str(tmp_path / "fd"), *B,
                               "--summary", "--repo", str(tmp_path / "repo"),
                               "--keys", str(wrong)], capsys)
    assert os.listdir(wrong) == []  # nothing written into the operator's directory
    assert code == 1 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and f"--keys {wrong} holds no" in err


def test_fleet_view_never_adopts_the_served_root(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """a18 (keys without an anchor), below the CLI's check: ``repository_releases`` itself
    refuses a key directory without ``trusted-root.json`` and writes nothing, where the
    repository's first-use migration would adopt the served root."""
    from modelward.publisher._fleet_summary import repository_releases
    from modelward.publisher._keyfile import ScryptParams
    from modelward.publisher._repo import Repository
    from modelward.publisher._served import TRUSTED_ROOT_FILE, MissingAnchorError
    from tests.conftest import PASSPHRASE

    monkeypatch.setattr("modelward.publisher._keyfile.DEFAULT_SCRYPT",
                        ScryptParams(2**10, 8, 1))
    Repository(tmp_path / "repo", tmp_path / "keys", PASSPHRASE).init()
    served = sorted(os.listdir(tmp_path / "repo" / "metadata"))
    wrong = tmp_path / "wrong-keys"
    wrong.mkdir()
    with pytest.raises(MissingAnchorError) as e:
        repository_releases(tmp_path / "repo", wrong, ["classifier"])
    assert e.value.path == wrong / TRUSTED_ROOT_FILE
    assert os.listdir(wrong) == []
    assert sorted(os.listdir(tmp_path / "repo" / "metadata")) == served
    # (the right key directory still works, and holds its anchor unchanged)
    anchor = (tmp_path / "keys" / TRUSTED_ROOT_FILE).read_bytes()
    assert repository_releases(tmp_path / "repo", tmp_path / "keys", ["classifier"]) == []
    assert (tmp_path / "keys" / TRUSTED_ROOT_FILE).read_bytes() == anchor


def test_one_device_pushes_honest_reasons_out_of_the_shown(tmp_path: Path) -> None:
    """Tried: 20 honest devices, each the only one with its reason (``Err00`` .. ``Err19``,
    all shown: 20 of 32); one liar adds 16 reasons named ``A00`` .. ``A15``, 1 attempt each.

    Happened: ``Err16`` .. ``Err19`` are no longer shown: other devices' rows folded into
    ``other`` (``devices: 4``), replaced by the liar's 16 names.

    Cause: the shown reasons are ranked by devices, ties broken by name, so at a tie a
    device picks names that sort first and its 16 rows outrank others' of the same count;
    one device has 16 rows of the 32 (MAX_REASONS of them) to spend.

    Fixed: ties on devices go to the higher weight (a device naming k reasons adds 1/k
    to each: all of one device's names weigh one device), then to the name.
    """
    reports = {f"h{i:02}": _rep(f"h{i:02}", failure_reasons={f"Err{i:02}": 1})
               for i in range(20)}
    honest = summarize(_rows(tmp_path / "a", reports))["failure_reasons"]
    assert sorted(honest) == [f"Err{i:02}" for i in range(20)]
    reports["liar"] = _rep("liar", failure_reasons={f"A{j:02}": 1 for j in range(MAX_REASONS)})
    fr = summarize(_rows(tmp_path / "b", reports))["failure_reasons"]
    assert all(fr.get(k) == v for k, v in honest.items())  # others' rows unchanged
    assert fr["other"] == {"devices": 1, "attempts": 4}  # the liar's 4 cut names, once


def test_a_device_s_own_other_counts_it_once(tmp_path: Path) -> None:
    """a18 (one device is 16 under ``other``), variant: a device that reports ``other``
    itself (its own overflow) and names of the rest is one device of ``other``, not a
    shown reason plus more shares, and its attempts there are capped once."""
    reports: dict[str, Any] = {}
    for i in range(MAX_SHOWN_REASONS):
        for j in range(2):
            d = f"h{i:02}{j}"
            reports[d] = _rep(d, failure_reasons={f"Err{i:02}": 1})
    reports["liar"] = _rep("liar", failure_reasons={
        "other": MAX_SEQ, **{f"Z{j:02}": MAX_SEQ for j in range(MAX_REASONS - 1)}})
    reports["solo"] = _rep("solo", failure_reasons={"other": 3})
    fr = summarize(_rows(tmp_path, reports))["failure_reasons"]
    assert all(fr[f"Err{i:02}"] == {"devices": 2, "attempts": 2}
               for i in range(MAX_SHOWN_REASONS))
    assert fr["other"] == {"devices": 2, "attempts": MAX_ATTEMPTS_PER_DEVICE + 3}


def test_outside_the_rollout_is_shown_apart(tmp_path: Path) -> None:
    """a18 (installed outside the rollout): a device above the percent that runs the
    release counts under ``outside``, and the terminal says so; the rollout's own figures
    stay those of the honest fleet."""
    ids = [f"d{i:02}" for i in range(20)]
    out = next(d for d in ids if rollout_bucket(d, "classifier", "2.0.0") >= 30.0)
    rel = RolloutRelease("classifier", "2.0.0", "stable", 30.0)
    reports = {d: _rep(d) for d in ids}
    honest = summarize(_rows(tmp_path / "a", reports), [rel])["rollouts"][0]
    reports[out] = _rep(out, "2.0.0")  # same channel, above the 30 %
    s = summarize(_rows(tmp_path / "b", reports), [rel])
    [r] = s["rollouts"]
    assert {k: v for k, v in r.items() if k != "outside"} == \
        {k: v for k, v in honest.items() if k != "outside"}
    assert (honest["outside"], r["outside"]) == (0, 1)
    assert "; 1 outside the rollout run it" in format_summary(s)


def test_lookalike_model_and_version_print_escaped(tmp_path: Path) -> None:
    """a18 (look-alike names), for the model and the version: ASCII on the terminal, with
    the look-alike as its escape; exact in JSON."""
    name, version = "cl\u0430ssifier", "1.0.\u0660"  # Cyrillic a, Arabic-Indic zero
    reports = {"h": _rep("h"), "liar": _rep("liar", model=name,
                                            active={**_rep("h")["active"], "name": name,
                                                    "version": version})}
    s = summarize(_rows(tmp_path, reports))
    text = format_summary(s)
    assert text.isascii()
    assert '"cl\\u0430ssifier" "1.0.\\u0660": 1' in text
    assert {(v["model"], v["version"]) for v in s["versions"]} == \
        {("classifier", "1.0.0"), (name, version)}


def test_all_missing_fleet_has_no_fallback_rate(tmp_path: Path) -> None:
    """Tried (careless operator): ``--summary`` when every enrolled device is MISSING
    (the broker lost the retained reports, or the wrong ``--fleet``).

    Happened: ``fallback rate: 0.0% (0 of 0 devices fell back; 0 ever did)`` and JSON
    ``"rate": 0.0``: a figure that reads as a healthy fleet, from no report at all (the
    durations, by contrast, say ``-`` with 0 samples; ``states:`` is an empty line).

    Cause: ``summarize`` writes ``fell / len(good) if good else 0.0``.

    Fixed: ``rate`` is None (terminal ``n/a``) when no report is believed.
    """
    rows = _rows(tmp_path, {"d1": None, "d2": None, "d3": None})
    s = summarize(rows)
    assert s["states"]["MISSING"] == 3 and s["believed"] == 0
    assert s["fallback"]["rate"] is None
    assert "fallback rate: 0.0%" not in format_summary(s)
