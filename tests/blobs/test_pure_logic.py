"""Pure logic of the blob migration: backoff, memory estimate, progress batching, order, credentials."""

from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from migration_assets.atproto.cid import CID, RAW
from migration_assets.blobs import credentials
from migration_assets.blobs.credentials import AccountCredentials, CredentialsError
from migration_assets.blobs.store import MigrationRequest, ProgressData
from migration_assets.blobs.transfer import (
    BYTES_PER_CID, MIB, ProgressTracker, TransferSettings, blob_backoff, blob_path, estimate_memory_mb,
    malformed_cid, transfer_order,
)


def raw_cid(data: bytes) -> str:
    return str(CID.for_block(data, RAW))


def test_blob_backoff_is_the_core_backoff_doubling_up_to_its_cap(tmp_path: Path):
    backoff = blob_backoff(TransferSettings(work_dir=tmp_path, backoff_base_seconds=2.0, backoff_cap_seconds=5.0))
    assert [backoff.ceiling(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 5.0, 5.0]
    assert all(0 <= backoff.delay(2) <= 4.0 for _ in range(50))


def test_memory_estimate_is_flat_in_blob_size_and_grows_with_the_cid_list():
    small = estimate_memory_mb(10, 256 * 1024)
    assert small == 5  # 4 MiB base + two 256 KiB chunks, rounded up
    assert estimate_memory_mb(100_000, 256 * 1024) == pytest.approx(4.5 + 100_000 * BYTES_PER_CID / MIB, abs=1)


def test_progress_is_written_every_ten_blobs_and_counts_bytes():
    written: list[tuple[int, int]] = []
    tracker = ProgressTracker(ProgressData(blobs_total=25, blobs_completed=3), 10,
                              lambda p: written.append((p.blobs_completed, p.bytes_transferred)))
    for _ in range(21):
        tracker.blob_done(100)
    tracker.blob_failed("bafkreixyz", "CidMismatch")
    assert written == [(13, 1000), (23, 2000)]  # the 10th and 20th blob, none for the 21st or the failure yet
    tracker.flush()
    assert written[-1] == (24, 2100)
    assert tracker.progress.failed_blobs[0].reason == "CidMismatch"
    assert tracker.progress.last_progress_update is not None


def test_completed_never_exceeds_total():
    tracker = ProgressTracker(ProgressData(blobs_total=2, blobs_completed=2), 10, lambda p: None)
    tracker.blob_done(1)  # a missing blob the old PDS did not list
    assert tracker.progress.blobs_completed == 2


def test_transfer_order_sends_only_missing_in_the_old_pds_order():
    assert transfer_order(["a", "b", "c", "d"], ["d", "x", "b"]) == ["b", "d", "x"]
    assert transfer_order(["a", "b"], []) == []


def test_blob_path_refuses_what_is_not_a_cid(tmp_path: Path):
    cid = raw_cid(b"hello")
    assert blob_path(tmp_path, "did:plc:abc", cid) == tmp_path / "did:plc:abc" / "blobs" / cid
    with pytest.raises(ValueError):
        blob_path(tmp_path, "did:plc:abc", "../../etc/passwd")


def test_credentials_round_trip_and_stay_encrypted(monkeypatch):
    monkeypatch.setenv("MIGRATION_SECRET_KEY", Fernet.generate_key().decode())
    token = credentials.encrypt(AccountCredentials(old_password="hunter2-old", new_password="hunter2-new"))
    assert b"hunter2" not in token
    back = credentials.decrypt(token, "blob migration 1")
    assert back.old_password.get_secret_value() == "hunter2-old"
    assert "hunter2" not in repr(back) and "hunter2" not in str(back)


def test_credentials_errors_name_the_key_and_the_next_step(monkeypatch):
    monkeypatch.setenv("MIGRATION_SECRET_KEY", Fernet.generate_key().decode())
    token = credentials.encrypt(AccountCredentials(old_password="a", new_password="b"))
    monkeypatch.setenv("MIGRATION_SECRET_KEY", Fernet.generate_key().decode())
    with pytest.raises(CredentialsError, match="blob migration 1 decrypt with none of the keys in MIGRATION_SECRET_KEY: add"):
        credentials.decrypt(token, "blob migration 1")
    with pytest.raises(CredentialsError, match="erased when it completed, failed for good or was superseded"):
        credentials.decrypt(None, "blob migration 1")
    good = Fernet.generate_key().decode()
    monkeypatch.setenv("MIGRATION_SECRET_KEY", f"{good},not-a-key")
    with pytest.raises(CredentialsError, match="key 2 of 2 in MIGRATION_SECRET_KEY is not a Fernet key") as raised:
        credentials.keyring()
    assert good not in str(raised.value)
    monkeypatch.delenv("MIGRATION_SECRET_KEY")
    with pytest.raises(CredentialsError, match="is not set"):
        credentials.keyring()


def test_older_keys_decrypt_and_the_newest_encrypts(monkeypatch):
    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    monkeypatch.setenv("MIGRATION_SECRET_KEY", old_key)
    old_token = credentials.encrypt(AccountCredentials(old_password="a", new_password="b"))
    monkeypatch.setenv("MIGRATION_SECRET_KEY", f" {new_key} , {old_key} ")  # newest first, spaces allowed
    assert credentials.decrypt(old_token, "m").new_password.get_secret_value() == "b"
    new_token = credentials.encrypt(AccountCredentials(old_password="c", new_password="d"))
    assert Fernet(new_key.encode()).decrypt(new_token)  # made with the newest key alone


def test_a_malformed_cid_is_named_with_its_reason():
    assert malformed_cid(raw_cid(b"fine")) is None
    assert "malformed CID in listMissingBlobs" in malformed_cid("../../etc/passwd")
    assert "not valid base32" in malformed_cid("b!!!!")
    # A valid CID whose blob can't be verified (and whose 329-character text no file name can hold)
    assert "not a sha2-256 one" in malformed_cid(str(CID(RAW, bytes(200), hash_code=0x00)))
    assert "not a sha2-256 one" in malformed_cid(str(CID(RAW, bytes(64), hash_code=0x13)))


def test_request_validation():
    request = MigrationRequest(did="did:plc:" + "a" * 24, old_pds="https://old.example/", new_pds="http://127.0.0.1:2583")
    assert request.old_pds == "https://old.example"
    with pytest.raises(ValidationError):
        MigrationRequest(did="alice.bsky.social", old_pds="https://a", new_pds="https://b")
    with pytest.raises(ValidationError, match="service root"):
        MigrationRequest(did="did:plc:" + "a" * 24, old_pds="https://a/xrpc", new_pds="https://b")
    with pytest.raises(ValidationError, match="http"):
        MigrationRequest(did="did:plc:" + "a" * 24, old_pds="ftp://a", new_pds="https://b")


def test_account_dir_refuses_what_is_not_a_did(tmp_path: Path):
    with pytest.raises(ValueError, match="unsafe DID"):
        blob_path(tmp_path, "../x", raw_cid(b"a"))
    with pytest.raises(ValueError, match="unsafe DID"):
        blob_path(tmp_path, "did:web:a/../../b", raw_cid(b"a"))


def test_blob_settings_name_a_bad_variable_and_never_show_a_secret(monkeypatch):
    from migration_assets.blobs.settings import BlobSettings
    from migration_assets.core.settings import SettingsError

    monkeypatch.setenv("MIGRATION_SECRET_KEY", "hunter2-key")
    monkeypatch.setenv("ATPROTO_OLD_PASSWORD", "hunter2-old")
    monkeypatch.setenv("BLOB_ATTEMPTS", "three")
    with pytest.raises(SettingsError, match="BLOB_ATTEMPTS \\(got 'three'\\)") as raised:
        BlobSettings.load()
    assert "hunter2" not in str(raised.value)
    monkeypatch.setenv("BLOB_ATTEMPTS", "5")
    settings = BlobSettings.load()
    assert settings.attempts == 5 and settings.old_password.get_secret_value() == "hunter2-old"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(BlobSettings.describe())
