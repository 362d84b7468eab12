"""MST keys are `collection/rkey` with a valid NSID and a valid record key (AT Protocol syntax): a repo
holding any other key fails with an error naming that key."""

import pytest

from migration_assets.atproto.mst import MstError, walk_records
from migration_assets.atproto.syntax import is_valid_nsid, is_valid_record_key
from tests.atproto.builders import build_mst, put

POST = "app.bsky.feed.post"


def walk(keys: list[str]) -> list[tuple[str, str]]:
    blocks: dict = {}
    record = put(blocks, {"$type": POST, "text": "hi"})
    root = build_mst({key: record for key in keys}, blocks)
    return [(collection, rkey) for collection, rkey, _ in walk_records(blocks, root)]


@pytest.mark.parametrize(
    "bad",
    [
        f"{POST}/..",
        f"{POST}/.",
        f"{POST}/has space",
        f"{POST}/" + "a" * 513,
        "noslash",
        f"{POST}/a/b",
        f"{POST}/",
        f"{POST}/caf\u00e9",
        "../3kabc",
        "not_an_nsid/3kabc",
        "app.bsky/3kabc",  # two segments
        "app.bsky.9post/3kabc",  # a name starting with a digit
        "app.-bsky.post/3kabc",
        "a" * 300 + ".b.c/3kabc",  # a domain segment longer than 63
        "/3kabc",
    ],
)
def test_a_key_that_is_not_collection_slash_record_key_fails_the_repo_naming_it(bad):
    with pytest.raises(MstError) as raised:
        walk([f"{POST}/3kgood", bad])
    message = str(raised.value)
    assert bad[:100] in message
    assert "MST key" in message


def test_valid_keys_of_every_allowed_shape_are_walked():
    keys = [
        f"{POST}/3jui7kd54zh2y",
        "app.bsky.actor.profile/self",
        "com.example.fooBar/a:b~c_d-e.f",
        f"{POST}/" + "z" * 512,
        f"{POST}/...",  # only "." and ".." are reserved
        "io.x-y.z9/1",
    ]
    assert sorted(walk(keys)) == sorted(tuple(k.split("/", 1)) for k in keys)


def test_syntax_rules():
    assert is_valid_nsid("app.bsky.feed.post") and is_valid_nsid("com.example.fooBar")
    assert not is_valid_nsid("com.example") and not is_valid_nsid("com.example.foo-bar")
    assert not is_valid_nsid("com.example." + "x" * 64)
    assert not is_valid_nsid(".".join(["abcdefghij"] * 30) + ".post")  # over 317 characters
    assert is_valid_record_key("self") and is_valid_record_key("a" * 512)
    assert not is_valid_record_key("") and not is_valid_record_key("a" * 513)
    assert not is_valid_record_key("a/b") and not is_valid_record_key("a#b")
