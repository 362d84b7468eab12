"""The local AT Protocol network (PLC + reference PDSes) and its seeder, against the real servers."""

import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from migration_assets.devstack.atproto import (
    Account,
    AtprotoNetwork,
    AtprotoNetworkError,
    PdsInfo,
    PdsSeeder,
    migrate_account,
    start_atproto_network,
)

COLLECTION = "com.example.record"
BLOB_LIMIT = 8_000_000  # above the reference PDS's 5 MB default, so raising it is exercised


@pytest.fixture(scope="module")
def network() -> Iterator[AtprotoNetwork]:
    net = start_atproto_network(2, blob_upload_limit=BLOB_LIMIT)
    print(f"\natproto network started in {net.start_seconds:.2f} s")
    yield net
    net.stop()


@pytest.fixture(scope="module")
def old(network: AtprotoNetwork) -> Iterator[PdsSeeder]:
    with PdsSeeder(network.pdses[0]) as seeder:
        yield seeder


@pytest.fixture(scope="module")
def new(network: AtprotoNetwork) -> Iterator[PdsSeeder]:
    with PdsSeeder(network.pdses[1]) as seeder:
        yield seeder


def xrpc_get(url: str, nsid: str, **params: str) -> httpx.Response:
    return httpx.get(f"{url}/xrpc/{nsid}", params=params, timeout=30)


def list_records(account: Account) -> dict[str, dict]:
    response = xrpc_get(account.pds.url, "com.atproto.repo.listRecords",
                        repo=account.did, collection=COLLECTION, limit="100")
    response.raise_for_status()
    return {r["uri"].rsplit("/", 1)[1]: r["value"] for r in response.json()["records"]}


def repo_car(account: Account) -> bytes:
    response = xrpc_get(account.pds.url, "com.atproto.sync.getRepo", did=account.did)
    response.raise_for_status()
    return response.content


def test_pdses_have_distinct_service_dids(network: AtprotoNetwork):
    dids = [pds.did for pds in network.pdses]
    assert len(set(dids)) == 2
    for pds in network.pdses:
        described = xrpc_get(pds.url, "com.atproto.server.describeServer").json()
        assert described["did"] == pds.did
        assert described["inviteCodeRequired"] is False
    assert network.environment() == {"ATPROTO_PLC_URL": network.plc_url,
                                     "ATPROTO_ALLOW_PRIVATE_HOSTS": "true"}


def test_plc_resolves_a_new_account_to_its_pds(network: AtprotoNetwork, old: PdsSeeder):
    account = old.create_account("t-resolve.test")
    doc = httpx.get(f"{network.plc_url}/{account.did}").json()
    assert doc["id"] == account.did
    assert doc["alsoKnownAs"] == ["at://t-resolve.test"]
    [pds_service] = [s for s in doc["service"] if s["id"] == "#atproto_pds"]
    assert pds_service["serviceEndpoint"] == network.pdses[0].url


def test_created_updated_and_deleted_records_show_in_the_repo(old: PdsSeeder):
    account = old.create_account("t-records.test")
    rkeys = old.create_records(account, COLLECTION, [{"n": n} for n in range(250)])  # two applyWrites
    assert len(set(rkeys)) == 250
    car_before = repo_car(account)

    old.update_records(account, COLLECTION, {rkeys[0]: {"n": -1}})
    old.delete_records(account, COLLECTION, rkeys[1:3])

    listed = {}
    cursor = None
    while True:
        params = {"repo": account.did, "collection": COLLECTION, "limit": "100",
                  **({"cursor": cursor} if cursor else {})}
        page = xrpc_get(account.pds.url, "com.atproto.repo.listRecords", **params).json()
        listed |= {r["uri"].rsplit("/", 1)[1]: r["value"] for r in page["records"]}
        cursor = page.get("cursor")
        if not cursor or not page["records"]:
            break
    assert set(listed) == set(rkeys) - set(rkeys[1:3])
    assert listed[rkeys[0]]["n"] == -1
    assert listed[rkeys[5]] == {"$type": COLLECTION, "n": 5}
    assert repo_car(account) != car_before


def test_fixed_rkeys_and_a_mismatch_is_refused(old: PdsSeeder):
    account = old.create_account("t-rkeys.test")
    assert old.create_records(account, COLLECTION, [{"n": 1}], rkeys=["fixed1"]) == ["fixed1"]
    assert list_records(account) == {"fixed1": {"$type": COLLECTION, "n": 1}}
    with pytest.raises(ValueError, match="1 rkeys for 2 records"):
        old.create_records(account, COLLECTION, [{"n": 2}, {"n": 3}], rkeys=["x"])


def test_refused_call_names_the_method_and_the_server_error(old: PdsSeeder):
    account = old.create_account("t-dup.test")
    with pytest.raises(AtprotoNetworkError, match=r"createAccount .* HTTP 400 .*Handle already taken"):
        old.create_account("t-dup.test")
    with pytest.raises(AtprotoNetworkError, match=r"applyWrites .* HTTP 400 InvalidRequest"):
        old.create_records(account, "not a collection", [{"n": 1}])


def test_deactivated_account_refuses_get_repo(old: PdsSeeder):
    account = old.create_account("t-deactivated.test")
    old.create_records(account, COLLECTION, [{"n": 1}])
    old.deactivate(account)
    response = xrpc_get(account.pds.url, "com.atproto.sync.getRepo", did=account.did)
    assert response.status_code == 400
    assert response.json()["error"] == "RepoDeactivated"


def test_takedown_refuses_get_repo_and_can_be_lifted(old: PdsSeeder):
    account = old.create_account("t-takendown.test")
    old.takedown(account)
    response = xrpc_get(account.pds.url, "com.atproto.sync.getRepo", did=account.did)
    assert response.status_code == 400
    assert response.json()["error"] == "RepoTakendown"
    old.takedown(account, applied=False)
    assert xrpc_get(account.pds.url, "com.atproto.sync.getRepo", did=account.did).status_code == 200


def test_takedown_with_a_wrong_admin_password_is_refused(network: AtprotoNetwork, old: PdsSeeder):
    account = old.create_account("t-notadmin.test")
    wrong = PdsSeeder(PdsInfo(network.pdses[0].url, network.pdses[0].did, "wrong"))
    with wrong, pytest.raises(AtprotoNetworkError, match="updateSubjectStatus .* HTTP 401"):
        wrong.takedown(account)


def test_migrated_account_expects_the_blobs_it_has_not_received(old: PdsSeeder, new: PdsSeeder):
    account = old.create_account("t-mover.test")
    old.create_records(account, COLLECTION, [{"n": n} for n in range(20)])
    _, small = old.create_record_with_blob(account, b"a" * 1000, "text/plain")
    _, streamed = old.create_record_with_blob(account, iter([b"b" * 100_000] * 3))
    blob_cids = {small["ref"]["$link"], streamed["ref"]["$link"]}
    assert streamed["size"] == 300_000

    moved = migrate_account(old, new, account, "new-password")

    assert (moved.did, moved.pds) == (account.did, new.pds)
    assert set(new.list_missing_blobs(moved)) == blob_cids
    status = new.check_account_status(moved)
    assert status["activated"] is False
    assert status["expectedBlobs"] == 2 and status["importedBlobs"] == 0
    assert status["indexedRecords"] == 22
    # the old PDS still serves the blobs the pipeline has to copy
    for cid in blob_cids:
        assert xrpc_get(old.pds.url, "com.atproto.sync.getBlob", did=account.did, cid=cid).status_code == 200


def test_blob_above_the_default_limit_uploads_when_raised(old: PdsSeeder):
    account = old.create_account("t-bigblob.test")
    data = bytes(range(256)) * (6_000_000 // 256)
    rkey, blob = old.create_record_with_blob(account, io.BytesIO(data))
    assert blob["size"] == len(data)
    listed = xrpc_get(old.pds.url, "com.atproto.sync.listBlobs", did=account.did).json()
    assert listed["cids"] == [blob["ref"]["$link"]]
    fetched = xrpc_get(old.pds.url, "com.atproto.sync.getBlob", did=account.did, cid=blob["ref"]["$link"])
    assert fetched.content == data
    record = xrpc_get(old.pds.url, "com.atproto.repo.getRecord", repo=account.did,
                      collection="com.example.blob", rkey=rkey).json()
    assert record["value"]["blob"]["ref"] == blob["ref"]


def test_blob_above_the_limit_is_refused(old: PdsSeeder):
    account = old.create_account("t-toobig.test")
    with pytest.raises(AtprotoNetworkError, match=r"uploadBlob .* HTTP 413 PayloadTooLarge"):
        old.upload_blob(account, b"x" * (BLOB_LIMIT + 1))


def listening_addresses(pid: int) -> list[str]:
    """Local hex addresses of the TCP sockets process `pid` listens on (from /proc)."""
    inodes = {os.readlink(fd).removeprefix("socket:[").rstrip("]")
              for fd in Path(f"/proc/{pid}/fd").iterdir() if os.readlink(fd).startswith("socket:")}
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                found.append(fields[1].split(":")[0])
    return found


def test_servers_listen_on_loopback_only(network: AtprotoNetwork):
    addresses = listening_addresses(network.server.process.pid)
    assert len(addresses) == 3  # PLC + 2 PDSes
    assert set(addresses) == {"0100007F"}  # 127.0.0.1, little-endian hex


def test_network_stops_and_removes_its_data_when_stdin_closes():
    net = start_atproto_network(1)
    assert net.data_dir.is_dir()
    net.stop()
    assert net.server.process.returncode == 0
    assert not net.data_dir.exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(net.plc_url, timeout=2)


def test_start_failure_reports_the_launcher_log(tmp_path):
    with pytest.raises(AtprotoNetworkError, match=r"exited with code 1[\s\S]*cannot be given --plc-url"):
        start_atproto_network(0, plc_url="http://localhost:1", log_path=tmp_path / "net.log")


def test_pdses_can_run_apart_from_their_plc():
    with start_atproto_network(0) as plc, start_atproto_network(1, plc_url=plc.plc_url) as pdses:
        assert pdses.plc_url == plc.plc_url and not plc.pdses
        assert len(listening_addresses(plc.server.process.pid)) == 1  # the PLC alone
        with PdsSeeder(pdses.pdses[0]) as seeder:
            account = seeder.create_account("apart.test")
        doc = httpx.get(f"{plc.plc_url}/{account.did}").json()
        [pds_service] = [s for s in doc["service"] if s["id"] == "#atproto_pds"]
        assert pds_service["serviceEndpoint"] == pdses.pdses[0].url
