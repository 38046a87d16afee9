"""The key store and the policy: hashed keys, revocation, one error for every failure."""

from __future__ import annotations

import sqlite3

import pytest

from server.auth import cli
from server.auth.limits import KeyLimits
from server.auth.policy import UNAUTHENTICATED_MESSAGE, AuthPolicy, bearer_token
from server.auth.store import KeyStore
from server.errors import Code, Unauthenticated


@pytest.fixture
def store(tmp_path):
    s = KeyStore(str(tmp_path / "keys.sqlite3"))
    yield s
    s.close()


def test_keys_are_stored_hashed_and_verify(store, tmp_path):
    key, record = store.create("ci", KeyLimits(models=frozenset({"demo"}), rpm=5))
    assert key.startswith(f"llmp_{record.key_id}_")
    got = store.verify(key)
    assert got is not None and got.key_id == record.key_id and got.limits.rpm == 5 and got.limits.models == {"demo"}
    secret = key[len(f"llmp_{record.key_id}_") :]  # base64url: the secret itself may contain "_"
    assert len(secret) == 43
    raw = sqlite3.connect(str(tmp_path / "keys.sqlite3")).execute("SELECT * FROM api_keys").fetchall()
    assert secret not in repr(raw) and key not in repr(raw)
    assert store.verify(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # wrong secret
    assert store.verify("llmp_000000000000_" + secret) is None  # unknown id
    assert store.verify("nonsense") is None
    assert store.verify(key + "x" * 1000) is None


def test_revoked_keys_stop_verifying(store):
    key, record = store.create("", KeyLimits())
    assert store.revoke(record.key_id)
    assert not store.revoke(record.key_id)
    assert store.verify(key) is None
    assert [r.revoked for r in store.list()] == [True]


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "Basic abc")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer llmp_000000000000_" + "a" * 43)],
        [("authorization", "Bearer " + "x" * 10_000)],
    ],
)
def test_every_failure_is_the_same_unauthenticated_error(store, metadata):
    policy = AuthPolicy(store)
    with pytest.raises(Unauthenticated) as info:
        policy.authenticate(metadata)
    assert info.value.code is Code.UNAUTHENTICATED and info.value.message == UNAUTHENTICATED_MESSAGE


def test_two_authorization_entries_are_refused(store):
    key, _ = store.create("", KeyLimits())
    assert bearer_token([("authorization", f"Bearer {key}")]) == key
    assert bearer_token([("authorization", f"bearer {key}")]) == key
    assert bearer_token([("authorization", f"Bearer {key}"), ("authorization", f"Bearer {key}")]) is None


def test_policy_admits_and_charges(store):
    now = [1000.0]
    policy = AuthPolicy(store, clock=lambda: now[0])
    key, _ = store.create("", KeyLimits(models=frozenset({"demo"}), tpm=10))
    principal = policy.authenticate([("authorization", f"Bearer {key}")])
    assert policy.admit(principal, "other", 0).code is Code.FORBIDDEN_MODEL  # type: ignore[union-attr]
    assert policy.admit(principal, "demo", 0) is None
    policy.charge(principal.key_id, 10)
    refused = policy.admit(principal, "demo", 0)
    assert refused is not None and refused.code is Code.RATE_LIMITED and refused.retry_after_s == pytest.approx(60.0)


def test_cli_create_list_revoke(tmp_path, capsys):
    db = str(tmp_path / "k.sqlite3")
    assert cli.main(["create", "--db", db, "--models", "demo,gpt", "--rpm", "3", "--tpm", "100", "--concurrency", "2"]) == 0
    key = capsys.readouterr().out.strip()
    store = KeyStore(db)
    record = store.verify(key)
    assert record is not None and record.limits.models == {"demo", "gpt"} and record.limits.concurrency == 2
    assert cli.main(["list", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert record.key_id in listing and key.rsplit("_", 1)[1] not in listing
    assert cli.main(["revoke", "--db", db, record.key_id]) == 0
    assert store.verify(key) is None
    assert cli.main(["revoke", "--db", db, record.key_id]) == 1
