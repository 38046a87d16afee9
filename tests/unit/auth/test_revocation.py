"""Revocations reach open connections (issue 20, point 3): the policy's cached revocation check
and the `--cancel-streams` report, driven by a fake clock."""

from __future__ import annotations

import sqlite3

import pytest

from server.auth.limits import KeyLimits
from server.auth.policy import REVOCATION_MAX_AGE_S, AuthPolicy, Principal
from server.auth.store import KeyStore
from server.errors import Code


@pytest.fixture
def store(tmp_path):
    s = KeyStore(str(tmp_path / "keys.sqlite3"))
    yield s
    s.close()


def test_an_admission_sees_a_revocation_within_the_cache_age(store):
    now = [1000.0]
    policy = AuthPolicy(store, clock=lambda: now[0])
    _, record = store.create("k", KeyLimits())
    principal = Principal(record.key_id, record.limits)
    assert policy.admit(principal, "demo", 0) is None
    store.revoke(record.key_id)
    now[0] += REVOCATION_MAX_AGE_S / 2
    assert policy.admit(principal, "demo", 0) is None  # the cached read is still fresh
    now[0] += REVOCATION_MAX_AGE_S / 2
    refused = policy.admit(principal, "demo", 0)
    assert refused is not None and refused.code is Code.UNAUTHENTICATED


def test_cancel_streams_is_reported_once_per_key_and_may_follow_a_plain_revoke(store):
    policy = AuthPolicy(store, clock=lambda: 0.0)
    _, a = store.create("a", KeyLimits())
    _, b = store.create("b", KeyLimits())
    assert policy.read_revocations() == []
    assert store.revoke(a.key_id) and not store.revoke(a.key_id)
    assert policy.read_revocations() == []  # revoked, streams left running
    assert store.revoke(a.key_id, cancel_streams=True) and store.revoke(b.key_id, cancel_streams=True)
    assert sorted(policy.read_revocations()) == sorted([a.key_id, b.key_id])
    assert policy.read_revocations() == []
    assert not store.revoke(a.key_id, cancel_streams=True)


def test_a_store_made_before_cancel_streams_gains_the_column(tmp_path):
    path = str(tmp_path / "old.sqlite3")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL DEFAULT '', salt BLOB NOT NULL, digest BLOB NOT NULL,"
               " models TEXT NOT NULL DEFAULT '', rpm INTEGER NOT NULL DEFAULT 0, tpm INTEGER NOT NULL DEFAULT 0,"
               " concurrency INTEGER NOT NULL DEFAULT 0, connections INTEGER NOT NULL DEFAULT 0, budget_tokens INTEGER NOT NULL DEFAULT 0,"
               " budget_period_s INTEGER NOT NULL DEFAULT 86400, created_at REAL NOT NULL, revoked_at REAL)")
    db.commit()
    db.close()
    store = KeyStore(path)
    _, record = store.create("k", KeyLimits())
    assert store.revoke(record.key_id, cancel_streams=True) and store.revocations() == {record.key_id: True}
    store.close()


def test_a_cancel_read_first_by_an_admission_still_reaches_the_watch(store):
    # An admission refreshes the cached revocations; the keys to cancel are still reported to
    # the next read of `watch` (they were lost when both shared one read).
    now = [0.0]
    policy = AuthPolicy(store, clock=lambda: now[0])
    _, record = store.create("k", KeyLimits())
    _, other = store.create("other", KeyLimits())
    assert policy.read_revocations() == []
    store.revoke(record.key_id, cancel_streams=True)
    now[0] += REVOCATION_MAX_AGE_S
    refused = policy.admit(Principal(other.key_id, other.limits), "demo", 0)  # reads the revocations
    assert refused is None
    assert policy.read_revocations() == [record.key_id]
