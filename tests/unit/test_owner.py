"""The owner claim's wire format (docs/payloads.md): round trip, empty = no owner, and a
payload that is not a claim still counts as one (a site is not taken lightly)."""

from __future__ import annotations

from controller.owner import OwnerClaim, claim_topic, probe_nonce, probe_topic


def test_claim_round_trip_and_answer() -> None:
    claim = OwnerClaim.mine(client_id="fh", journal="/j", api="127.0.0.1:8080", keepalive_s=10)
    parsed = OwnerClaim.parse(claim.to_json(), default_keepalive_s=99)
    assert parsed == claim
    answer = OwnerClaim.parse(claim.answering("abc").to_json(), default_keepalive_s=99)
    assert answer is not None
    assert answer.answer_to == "abc"
    assert answer.instance == claim.instance
    assert "/j" in claim.describe()


def test_empty_payload_is_no_owner() -> None:
    assert OwnerClaim.parse(b"", default_keepalive_s=10) is None


def test_a_payload_that_is_not_a_claim_is_an_unknown_owner() -> None:
    for payload in (b"garbage", b"{}", b'{"keepalive_s": -1}', b"[1, 2]"):
        claim = OwnerClaim.parse(payload, default_keepalive_s=7)
        assert claim is not None, payload
        assert claim.keepalive_s == 7
        assert claim.host == "an unknown host"


def test_topics_and_probe_nonce() -> None:
    assert claim_topic("floorhand", "demo") == "floorhand/demo/owner"
    assert probe_topic("floorhand", "demo") == "floorhand/demo/owner/probe"
    assert probe_nonce(b'{"nonce": "n1", "pid": 3}') == "n1"
    for bad in (b"x", b"[]", b'{"nonce": 5}', b'{"nonce": ""}', b'{"nonce": "' + b"a" * 65 + b'"}'):
        assert probe_nonce(bad) is None
