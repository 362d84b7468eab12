"""Pure logic of the chain pipeline: range keys and the ordering of one height's items."""

import pytest

from migration_assets.chain.ranges import complete_ranges, covering_ranges, parse_range_key, range_key
from migration_assets.chain.source import MultipleCanonicalError, SourceDataError, order_height
from tests.chain.helpers import TAG, canonical_pair, orphan, skipped


def test_range_keys_round_trip_and_sort():
    keys = [range_key(s, s + 10_000) for s in (0, 90_000, 100_000, 1_000_000)]
    assert keys == sorted(keys)
    assert keys[0] == "000000000000-000000010000"
    assert [parse_range_key(k) for k in keys][2] == (100_000, 110_000)


@pytest.mark.parametrize("bad", ["0-10", "000000000010-000000000010", "abc", "000000000000-00000001000"])
def test_bad_range_keys_are_refused(bad):
    with pytest.raises(ValueError):
        parse_range_key(bad)


def test_covering_ranges_snap_outwards():
    assert covering_ranges(5, 25, 10) == [(0, 10), (10, 20), (20, 30)]
    assert covering_ranges(10, 20, 10) == [(10, 20)]
    with pytest.raises(ValueError):
        covering_ranges(20, 10, 10)


def test_complete_ranges_stop_below_the_tip():
    assert complete_ranges(0, 29, 10) == [(0, 10), (10, 20), (20, 30)]
    assert complete_ranges(0, 28, 10) == [(0, 10), (10, 20)]
    assert complete_ranges(30, 28, 10) == []


def test_order_height_puts_the_canonical_last_once():
    items = [*canonical_pair(5), orphan(5, 2), orphan(5, 1)]
    height = order_height(TAG, 5, items)
    assert height.canonical is height.blocks[-1]
    assert len(height.blocks) == 3 and height.non_canonical_count == 2


def test_order_height_keeps_a_skipped_block_by_height():
    height = order_height(TAG, 8, skipped(8))
    assert len(height.blocks) == 1 and height.canonical.skipped and height.canonical.hash is None


def test_order_height_refuses_two_canonical_items():
    first, canonical = canonical_pair(5)
    other = {**canonical, "block_hash": {"S": "0xother"}}
    with pytest.raises(MultipleCanonicalError, match="multiple canonical blocks found for 1-5"):
        order_height(TAG, 5, [first, canonical, other])


def test_order_height_refuses_an_item_of_another_height():
    with pytest.raises(SourceDataError, match="says tag 1 height 6"):
        order_height(TAG, 5, canonical_pair(6))


def test_a_block_without_hash_is_malformed():
    item = orphan(5, 1)
    item["block_hash"] = {"S": ""}
    with pytest.raises(SourceDataError, match="not skipped but has no block_hash"):
        order_height(TAG, 5, [item])
