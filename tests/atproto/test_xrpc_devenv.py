"""XrpcClient and IdentityResolver against a real reference PDS and PLC (@atproto/dev-env on loopback)."""

from collections.abc import Iterator

import pytest

from migration_assets.atproto.car import CarReader
from migration_assets.atproto.identity import IdentityResolver
from migration_assets.atproto.signature import verify_commit
from migration_assets.atproto.xrpc import AuthRequired, RepoDeactivated, RepoNotFound, XrpcClient
from migration_assets.devstack.atproto import Account, AtprotoNetwork, PdsSeeder, start_atproto_network

UNKNOWN_DID = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> Iterator[AtprotoNetwork]:
    network = start_atproto_network(pds_count=1, log_path=tmp_path_factory.mktemp("logs") / "atproto.log")
    yield network
    network.stop()


@pytest.fixture(scope="module")
def seeded(network) -> tuple[PdsSeeder, list[Account]]:
    seeder = PdsSeeder(network.pdses[0])
    accounts = [seeder.create_account(f"user{i}.test") for i in range(5)]
    seeder.create_records(accounts[0], "app.bsky.feed.post",
                          [{"$type": "app.bsky.feed.post", "text": f"post {i}", "createdAt": "2024-05-01T00:00:00.000Z"}
                           for i in range(30)])
    yield seeder, accounts
    seeder.close()


@pytest.fixture
def client(network) -> Iterator[XrpcClient]:
    with XrpcClient(network.pdses[0].url, allow_private_hosts=True) as client:
        yield client


def test_login_and_refresh(client, seeded):
    _, accounts = seeded
    client.login(accounts[0].handle, accounts[0].password)
    assert client.session_did == accounts[0].did
    assert client.query("com.atproto.server.getSession", auth=True)["did"] == accounts[0].did
    client.refresh_session()
    assert client.query("com.atproto.server.getSession", auth=True)["did"] == accounts[0].did
    with pytest.raises(AuthRequired):
        client.login(accounts[0].handle, "wrong password")


def test_list_repos_pages_through_every_account(client, seeded):
    _, accounts = seeded
    seen, cursor, pages = [], None, 0
    while True:
        page = client.query("com.atproto.sync.listRepos", {"limit": 2, "cursor": cursor})
        seen += [repo["did"] for repo in page["repos"]]
        pages += 1
        cursor = page.get("cursor")
        if not cursor or not page["repos"]:
            break
    assert sorted(seen) == sorted(a.did for a in accounts) and len(seen) == len(set(seen))
    assert pages >= 3


def test_get_repo_streams_a_car_whose_commit_verifies_against_the_plc_key(client, seeded, network):
    _, accounts = seeded
    with client.stream("com.atproto.sync.getRepo", {"did": accounts[0].did}) as reply:
        assert reply.headers["content-type"].startswith("application/vnd.ipld.car")
        reader = CarReader(reply.iter_bytes(), max_size=50_000_000)
        blocks = dict(reader)
    commit = blocks[reader.roots[0]]
    with IdentityResolver(network.plc_url, allow_private_hosts=True) as resolver:
        doc = resolver.resolve(accounts[0].did)
    assert doc.pds_endpoint.rstrip("/") == network.pdses[0].url.rstrip("/")
    verify_commit(commit, doc.signing_key)
    assert len(blocks) > 30  # 30 posts plus MST nodes and the commit


def test_unknown_and_deactivated_repos_raise_typed_errors(client, seeded):
    seeder, accounts = seeded
    with pytest.raises(RepoNotFound) as raised:
        client.query("com.atproto.sync.getLatestCommit", {"did": UNKNOWN_DID})
    assert raised.value.error == "RepoNotFound"
    with pytest.raises(RepoNotFound):
        with client.stream("com.atproto.sync.getRepo", {"did": UNKNOWN_DID}):
            pass
    seeder.deactivate(accounts[4])
    with pytest.raises(RepoDeactivated):
        client.query("com.atproto.sync.getLatestCommit", {"did": accounts[4].did})
