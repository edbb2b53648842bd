"""Re-screen state store and lock (cathode_ray.screen.state) on local disk and on moto S3."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from cathode_ray.screen import state as st
from cathode_ray.screen.state import LockLost, RescreenBusy, StateError, StateLock, StateStore


def _expire(lock_uri: str, *, s3: bool) -> None:
    """Rewrite the stored lock so that it expired a minute ago (owner unchanged)."""
    held = (json.loads(st.s3_get(lock_uri)[0]) if s3 else json.loads(Path(lock_uri).read_text()))
    held["expires_at"] = time.time() - 60
    data = json.dumps(held).encode()
    if s3:
        st.s3_put(lock_uri, data)
    else:
        Path(lock_uri).write_bytes(data)


# --------------------------------------------------------------------------- local
def test_local_state_roundtrip_and_seq(tmp_path: Path) -> None:
    store = StateStore(uri=str(tmp_path / "_state"))
    assert store.read() is None
    store.write({"db_version": "A", "fingerprints": {"mp-1": "x"}})
    store.write({"db_version": "B", "fingerprints": {}})
    got = store.read()
    assert got["db_version"] == "B" and got["seq"] == 2 and got["format"] == st.STATE_FORMAT
    assert sorted(p.name for p in (tmp_path / "_state").iterdir()) == ["state.json"]


def test_local_crash_during_write_keeps_old_state(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(uri=str(tmp_path / "_state"))
    store.write({"db_version": "A"})

    def boom(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(st.os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        store.write({"db_version": "B"})
    monkeypatch.undo()
    assert store.read()["db_version"] == "A"
    assert sorted(p.name for p in (tmp_path / "_state").iterdir()) == ["state.json"]  # no temp


def test_local_lock_busy_release_and_expiry(tmp_path: Path) -> None:
    uri = str(tmp_path / "_state")
    first = StateLock(uri=uri, ttl_s=60, heartbeat=False).acquire()
    held = first.read()
    assert held["owner"] == first.owner and held["expires_at"] > time.time()
    with pytest.raises(RescreenBusy, match="another re-screen is running"):
        StateLock(uri=uri, ttl_s=60, heartbeat=False).acquire()
    first.release()
    assert first.read() is None
    with StateLock(uri=uri, ttl_s=60, heartbeat=False) as again:
        assert again.read()["owner"] == again.owner
    # an expired lock (owner process gone) is taken over; the old owner notices
    old = StateLock(uri=uri, ttl_s=60, heartbeat=False).acquire()
    _expire(old.lock_uri, s3=False)
    new = StateLock(uri=uri, ttl_s=60, heartbeat=False).acquire()
    assert new.read()["owner"] == new.owner
    with pytest.raises(LockLost):
        old.refresh()
    old.release()  # not the owner any more: must not delete the new lock
    assert new.read()["owner"] == new.owner
    new.release()
    assert list((tmp_path / "_state").iterdir()) == []  # lock and guard removed


def test_local_lock_unreadable_file_is_busy_until_ttl(tmp_path: Path) -> None:
    path = tmp_path / "_state" / "LOCK"
    path.parent.mkdir()
    path.write_bytes(b"")  # torn by a crash, or hand-edited
    with pytest.raises(RescreenBusy, match="unknown"):
        StateLock(uri=str(tmp_path / "_state"), ttl_s=60, heartbeat=False).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    with StateLock(uri=str(tmp_path / "_state"), ttl_s=60, heartbeat=False) as lock:
        assert lock.read()["owner"] == lock.owner


def _race(uri: str, rounds: int, start: float) -> list[int]:
    """In a child process: from ``start`` (epoch s), try to take an expired lock ``rounds``
    times; returns the rounds this process won."""
    won = []
    for i in range(rounds):
        while time.time() < start + 0.02 * i:
            pass
        try:
            lock = StateLock(uri=f"{uri}/{i}", ttl_s=60, heartbeat=False).acquire()
        except RescreenBusy:
            continue
        won.append(i)
        lock._stop.set()  # keep the lock: the others must see it held
    return won


def test_local_lock_takeover_race_has_one_winner(tmp_path: Path) -> None:
    import multiprocessing

    rounds = 200
    for i in range(rounds):  # an expired lock of a process elsewhere in every round
        d = tmp_path / str(i)
        d.mkdir()
        (d / "LOCK").write_text(json.dumps({"owner": "gone", "host": "elsewhere", "pid": 1,
                                            "expires_at": time.time() - 10}))
    start = time.time() + 1.0
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        wins = pool.starmap(_race, [(str(tmp_path), rounds, start)] * 3)
    winners = sorted(i for w in wins for i in w)
    assert winners == list(range(rounds))  # each round exactly one winner, never two or none
    for i in range(rounds):
        assert json.loads((tmp_path / str(i) / "LOCK").read_text())["owner"] != "gone"


def test_local_lock_heartbeat_extends_expiry(tmp_path: Path) -> None:
    with StateLock(uri=str(tmp_path / "s"), ttl_s=0.6) as lock:
        first = lock.read()["expires_at"]
        time.sleep(0.5)
        assert lock.read()["expires_at"] > first


# --------------------------------------------------------------------------- S3 (moto)
def test_s3_state_versioned_keys_and_pointer(s3_server: str) -> None:
    import boto3

    store = StateStore(uri="s3://screen/rs/_state")
    assert store.read() is None
    store.write({"db_version": "A"})
    uri_b = store.write({"db_version": "B"})
    assert store.read()["db_version"] == "B"
    pointer = json.loads(st.s3_get("s3://screen/rs/_state/CURRENT")[0])
    assert pointer["seq"] == 2 and uri_b.endswith(pointer["key"])
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server)
            .list_objects_v2(Bucket="screen", Prefix="rs/_state/")["Contents"]]
    assert len([k for k in keys if "/state-" in k]) == 2


def test_s3_crash_before_pointer_keeps_old_state(s3_server: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(uri="s3://screen/crash/_state")
    store.write({"db_version": "A"})
    real_put = st.s3_put

    def crash_on_pointer(uri: str, data: bytes, **kw: object) -> str | None:
        if uri.endswith("/CURRENT"):
            raise ConnectionError("killed")
        return real_put(uri, data, **kw)

    monkeypatch.setattr(st, "s3_put", crash_on_pointer)
    with pytest.raises(ConnectionError):
        store.write({"db_version": "B"})
    monkeypatch.undo()
    assert store.read()["db_version"] == "A"  # orphan state-2 is never pointed at
    store.write({"db_version": "C"})
    assert store.read()["db_version"] == "C" and store.read()["seq"] == 2


def test_s3_concurrent_pointer_update_is_refused(s3_server: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(uri="s3://screen/race/_state")
    store.write({"db_version": "A"})
    real_read = StateStore._read_pointer
    stale = real_read(store)
    store.write({"db_version": "B"})  # the other writer commits after we read the pointer
    monkeypatch.setattr(StateStore, "_read_pointer", lambda self: stale)
    with pytest.raises(StateError, match="concurrently"):
        store.write({"db_version": "C"})
    monkeypatch.undo()
    assert store.read()["db_version"] == "B"


def test_s3_lock_busy_takeover_and_release(s3_server: str) -> None:
    uri = "s3://screen/lock/_state"
    first = StateLock(uri=uri, ttl_s=60, heartbeat=False).acquire()
    with pytest.raises(RescreenBusy, match=first.owner):
        StateLock(uri=uri, ttl_s=60, heartbeat=False).acquire()
    first.release()
    assert first.read() is None
    old = StateLock(uri=uri, ttl_s=60, heartbeat=False).acquire()
    _expire(old.lock_uri, s3=True)
    new = StateLock(uri=uri, ttl_s=60, heartbeat=False).acquire()  # If-Match takeover
    assert new.read()["owner"] == new.owner
    with pytest.raises(LockLost):
        old.refresh()  # its ETag is stale
    old.release()  # conditional delete fails: the new lock stays
    assert new.read()["owner"] == new.owner
    new.refresh()
    new.release()
    assert new.read() is None


def test_lock_is_stale_rules() -> None:
    now = time.time()
    assert st.lock_is_stale({"expires_at": now - 1})
    assert not st.lock_is_stale({"expires_at": now + 60, "host": "elsewhere", "pid": 1})
    mine = {"expires_at": now + 60, "host": socket.gethostname(), "pid": os.getpid()}
    assert not st.lock_is_stale(mine)
    with pytest.raises(ValueError):
        StateLock(uri="x", ttl_s=0)
    with pytest.raises(ValueError):
        StateStore(uri="")


def test_run_lock_is_the_same_lock_on_s3(s3_server: str) -> None:
    from cathode_ray.screen.runs import RunLock, RunLockedError

    uri = "s3://screen/runlock/_runs/r.lock"
    with RunLock(uri=uri, run_id="r", heartbeat=False) as held:
        assert held.read()["run_id"] == "r" and held.read()["owner"] == held.owner
        with pytest.raises(RunLockedError, match="'r' is already running.*another --run-id"):
            RunLock(uri=uri, run_id="r", heartbeat=False).acquire()
        _expire(uri, s3=True)
        taker = RunLock(uri=uri, run_id="r", heartbeat=False).acquire()  # abandoned: taken over
    assert taker.read()["owner"] == taker.owner  # the old owner's release left it alone
    taker.release()
    assert taker.read() is None


def test_release_with_storage_unreachable_only_logs(tmp_path: Path, monkeypatch, caplog) -> None:
    lock = StateLock(uri=str(tmp_path / "s"), ttl_s=60, heartbeat=False).acquire()

    def unreachable(self, path):  # noqa: ANN001, ANN202
        raise ConnectionError("storage away")

    monkeypatch.setattr(StateLock, "_read_local", unreachable)
    lock.release()  # must not raise: it runs while another error may be propagating
    assert "could not release lock" in caplog.text
    assert Path(lock.lock_uri).exists()  # left to expire


def test_file_uri_state_and_lock_land_at_the_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path.parent)  # a relative "file:" folder would appear here
    uri = f"file://{tmp_path}/dest/_state"
    StateStore(uri=uri).write({"db_version": "v1"})
    assert json.loads((tmp_path / "dest" / "_state" / "state.json").read_text())["db_version"] == "v1"
    with StateLock(uri=uri, ttl_s=60, heartbeat=False):
        assert (tmp_path / "dest" / "_state" / "LOCK").exists()
        with pytest.raises(RescreenBusy):  # the same lock, by plain path
            StateLock(uri=str(tmp_path / "dest" / "_state"), ttl_s=60, heartbeat=False).acquire()
    assert not list(tmp_path.parent.glob("file:*"))
