"""Items a broken writer could leave in the source, read against real dynalite: each fails its range,
naming the table, the item's key and the attribute, and nothing is read as what it is not."""

import pytest

from migration_assets.devstack.sample_chain import block_hash, sample_chain
from migration_assets.devstack.sample_events import chain_events
from tests.chain.helpers import (
    TAG, canonical_pair, failure_text, linear_chain, materialize_events, materialize_range, seed, skipped,
)


def stored_blocks(conn) -> list[tuple]:
    return conn.execute("SELECT height, hash, skipped FROM block_metadata ORDER BY height, id").fetchall()


@pytest.mark.parametrize("value", [{"S": "false"}, {"S": "true"}, {"S": ""}, {"N": "2"}])
def test_a_skipped_flag_that_is_not_a_boolean_fails_the_block_range(instance, dynamodb, block_table, target, value):
    items = linear_chain(0, 10)
    bad = next(i for i in items if i["block_pid"]["S"] == f"{TAG}-4" and i["block_rid"]["S"] != "canonical")
    bad["skipped"] = value  # e.g. a writer that stored str(False)
    seed(dynamodb, block_table, items)

    result = materialize_range(instance, 0, 10)

    assert not result.success
    text = failure_text(result)
    assert f"malformed block item {TAG}-4/{block_hash(TAG, 4)} in table {block_table}" in text, text
    assert "attribute 'skipped' must be a boolean" in text, text


def test_skipped_as_a_number_0_or_1_is_read_as_a_boolean(instance, dynamodb, block_table, target):
    items = linear_chain(0, 3) + skipped(3) + linear_chain(4, 6)
    for item in items:
        item["skipped"] = {"N": "1" if item["skipped"]["BOOL"] else "0"}
    seed(dynamodb, block_table, items)

    result = materialize_range(instance, 0, 6)

    assert result.success, failure_text(result)
    assert [(h, s) for h, _, s in stored_blocks(target)] == [(0, False), (1, False), (2, False), (3, True), (4, False), (5, False)]


# The last six are values DynamoDB takes that chainstorage's PostgreSQL columns can't hold: before, each
# failed the range's COPY with an error naming a line of it (or a UnicodeEncodeError), not the item.
@pytest.mark.parametrize("attribute, value, expected", [
    ("height", {"S": "4"}, "attribute 'height' must be an integer (N), got S '4'"),
    ("tag", {"N": "1.5"}, "attribute 'tag' must be an integer (N), got N '1.5'"),
    ("block_hash", {"N": "7"}, "attribute 'block_hash' must be a string (S), got N '7'"),
    ("timestamp", {"BOOL": True}, "attribute 'timestamp' must be an integer (N), got BOOL True"),
    ("object_key_main", {"S": "blocks/4\u0000"}, "attribute 'object_key_main' holds U+0000 or a lone surrogate"),
    ("parent_hash", {"S": "0x\ud800"}, "attribute 'parent_hash' holds U+0000 or a lone surrogate"),
    ("block_hash", {"S": "0x" + "a" * 65}, "attribute 'block_hash' is 67 characters, over the 66 its column holds"),
    ("object_key_main", {"S": "k" * 300}, "attribute 'object_key_main' is 300 characters, over the 255 its column holds"),
    ("timestamp", {"N": "1" + "0" * 19}, "attribute 'timestamp' is 10000000000000000000, past what a 64-bit integer"),
    ("parent_height", {"N": "-" + "9" * 20}, "attribute 'parent_height' is -99999999999999999999, past what a 64-bit"),
])
def test_a_block_attribute_of_the_wrong_type_or_past_its_column_fails_naming_it(instance, dynamodb, block_table, target,
                                                                                attribute, value, expected):
    items = linear_chain(0, 10)
    bad = next(i for i in items if i["block_pid"]["S"] == f"{TAG}-4" and i["block_rid"]["S"] == "canonical")
    bad[attribute] = value
    seed(dynamodb, block_table, items)

    result = materialize_range(instance, 0, 10)

    assert not result.success
    text = failure_text(result)
    assert f"malformed block item {TAG}-4/canonical in table {block_table}: {expected}" in text, text
    assert stored_blocks(target) == [], "the range stores nothing"


def test_a_malformed_watermark_names_its_table_and_attribute(dynamodb, block_table):
    from migration_assets.chain.source import SourceDataError, latest_block

    seed(dynamodb, block_table, [{**canonical_pair(3)[1], "block_pid": {"S": f"{TAG}-latest"}, "height": {"S": "3"}}])
    with pytest.raises(SourceDataError, match=f"malformed watermark item {TAG}-latest/canonical in table "
                       f"{block_table}: attribute 'height' must be an integer"):
        latest_block(dynamodb, block_table, TAG)


def seed_events(dynamodb, block_table, event_table, heights: int):
    events_name, layout = event_table
    blocks = list(sample_chain(TAG, 0, heights))
    events = list(chain_events(blocks, layout))
    seed(dynamodb, block_table, blocks)
    return events_name, layout, events


@pytest.mark.parametrize("attribute, value, expected", [
    ("skipped", {"S": "false"}, "attribute 'skipped' must be a boolean (BOOL, or N 0 or 1), got S 'false'"),
    ("skipped", {"N": "-1"}, "attribute 'skipped' must be a boolean (BOOL, or N 0 or 1), got N '-1'"),
    ("type", {"S": "1"}, "attribute 'type' must be an integer (N), got S '1'"),
    ("type", {"N": "7"}, "attribute 'type' must be 0, 1 or 2, got 7"),
    ("tag", {"S": "1"}, "attribute 'tag' must be an integer (N), got S '1'"),
    ("sequence", {"N": "6"}, "attribute 'sequence' is 6, which is not the item's key"),
    ("hash", {"S": "0x\u0000"}, "attribute 'hash' holds U+0000 or a lone surrogate"),
    ("tag", {"N": str(1 << 31)}, "attribute 'tag' is 2147483648, past what a 32-bit integer column holds"),
])
def test_a_malformed_event_fails_its_range_naming_table_key_and_attribute(
    instance, dynamodb, block_table, event_table, target, attribute, value, expected
):
    events_name, layout, events = seed_events(dynamodb, block_table, event_table, 20)
    events[4][attribute] = value  # the event with id 5
    seed(dynamodb, events_name, events)
    assert materialize_range(instance, 0, 20).success

    result = materialize_events(instance, 0, 1000)

    assert not result.success
    key = "5" if layout.legacy else f"{layout.event_tag}-5"
    text = failure_text(result)
    assert f"malformed event item {key} in table {events_name}: {expected}" in text, text
    assert target.execute("SELECT count(*) FROM block_events").fetchone()[0] == 0, "the range stores nothing"
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert not retries, "a malformed item is not retried"
