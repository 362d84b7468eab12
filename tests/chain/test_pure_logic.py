"""Pure logic of the chain pipeline: range keys and the ordering of one height's items."""

from types import SimpleNamespace

import pytest
from botocore.exceptions import ClientError

from migration_assets.chain.event_source import UNPROCESSED_MAX_SECONDS, batch_get
from migration_assets.chain.items import pages
from migration_assets.chain.scan import THROTTLED_MAX_SECONDS, ScanRequest, ScanThrottled, scan_pages
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


# --- reading the source when it misbehaves (stub clients: paging and throttling are the logic here) ---


class _Pages:
    """A client whose pages carry the given LastEvaluatedKeys, in turn."""

    def __init__(self, keys):
        self.keys, self.calls = list(keys), 0

    def query(self, **request):
        key = self.keys[min(self.calls, len(self.keys) - 1)]
        self.calls += 1
        return {"Items": [{"n": {"N": str(self.calls)}}], **({"LastEvaluatedKey": key} if key else {})}


def test_paging_follows_each_key_and_stops_at_one_that_comes_back():
    assert [len(page["Items"]) for page in pages(_Pages([{"k": {"S": "a"}}, None]).query, {}, "t")] == [1, 1]
    going_round = _Pages([{"k": {"S": "a"}}, {"k": {"S": "b"}}, {"k": {"S": "a"}}])
    with pytest.raises(SourceDataError, match=r"table t answered the page key .* a second time"):
        list(pages(going_round.query, {}, "t"))  # before: paged A, B, A, B... without end
    assert going_round.calls == 3


class _Unprocessed:
    def __init__(self):
        self.calls = 0

    def batch_get_item(self, RequestItems):
        self.calls += 1
        return {"Responses": {"t": []}, "UnprocessedKeys": RequestItems}


def test_unprocessed_keys_are_asked_for_again_for_minutes_not_a_dozen_tries():
    """Before: 12 tries in about 13 s, then a 100,000-event range failed on a throttling burst."""
    client, slept = _Unprocessed(), []
    with pytest.raises(RuntimeError, match=r"still unprocessed after \d+ BatchGetItem attempts in 30\d s"):
        batch_get(client, "t", [{"event_id": {"N": "1"}}], sleep=slept.append)
    assert sum(slept) >= UNPROCESSED_MAX_SECONDS and client.calls > 12


class _Throttled:
    meta = SimpleNamespace(events=SimpleNamespace(register=lambda *args, **kwargs: None))

    def scan(self, **args):
        raise ClientError({"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"}}, "Scan")


def test_a_scan_throttled_for_good_stops_saying_so():
    """Before: retried without end and without a word (500 tries, 1.4 hours of waits, still going)."""
    slept: list[float] = []
    request = ScanRequest(kind="BLOCKS", table="t", tag=1, start=0, end=10, range_size=10, database_url="", segments=1)
    with pytest.raises(ScanThrottled, match="throttled for 9\\d\\d s"):
        list(scan_pages(_Throttled(), request, 0, None, None, sleep=slept.append))
    assert THROTTLED_MAX_SECONDS <= sum(slept) < THROTTLED_MAX_SECONDS + 30
