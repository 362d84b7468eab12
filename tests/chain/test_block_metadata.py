"""The block asset against real dynalite and PostgreSQL: reorgs, skipped blocks, pages, re-runs."""

import pytest

from migration_assets.chain.assets import block_metadata
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.devstack.sample_chain import block_hash, block_item, sample_chain
from tests.chain.helpers import (
    TAG, canonical_pair, check_outcomes, failure_text, linear_chain, materialization_metadata, materialize_range,
    orphan, quick_sync_retries, retry_reasons, seed, skipped, step_retries,
)
from tests.fault_proxy import THROTTLED, fault_proxy


def blocks_by_height(conn, height):
    return conn.execute(
        "SELECT id, hash, skipped, parent_height FROM block_metadata WHERE tag = %s AND height = %s ORDER BY id",
        (TAG, height),
    ).fetchall()


def canonical_hash(conn, height):
    row = conn.execute(
        "SELECT bm.hash, bm.skipped, bm.id FROM canonical_blocks cb JOIN block_metadata bm ON bm.id = cb.block_metadata_id"
        " WHERE cb.tag = %s AND cb.height = %s",
        (TAG, height),
    ).fetchone()
    return row


def test_reorgs_skipped_and_missing_canonical(instance, dynamodb, block_table, target):
    items = linear_chain(0, 5)
    # Height 5: three reorged blocks, then the winner (branch 0).
    items += [orphan(5, 1), orphan(5, 2), orphan(5, 3)] + canonical_pair(5)
    items += linear_chain(6, 8) + skipped(8)
    items += canonical_pair(9, parent_height=7) + linear_chain(10, 12)
    items += [orphan(12, 1), orphan(12, 2)]  # blocks but no canonical item
    items += linear_chain(13, 20)
    seed(dynamodb, block_table, items)

    result = materialize_range(instance, 0, 20)

    assert result.success
    at_five = blocks_by_height(target, 5)
    assert len(at_five) == 4
    # The canonical block is migrated last, so it has the highest id at its height.
    assert at_five[-1][1] == block_hash(TAG, 5) and canonical_hash(target, 5)[2] == at_five[-1][0]
    assert {row[1] for row in at_five[:-1]} == {block_hash(TAG, 5, b) for b in (1, 2, 3)}
    assert blocks_by_height(target, 8) == [(blocks_by_height(target, 8)[0][0], None, True, 0)]
    assert canonical_hash(target, 8)[:2] == (None, True)
    assert canonical_hash(target, 12) is None and len(blocks_by_height(target, 12)) == 2
    assert target.execute("SELECT count(*) FROM block_metadata").fetchone()[0] == 24
    assert target.execute("SELECT count(*) FROM canonical_blocks").fetchone()[0] == 19

    meta = materialization_metadata(result)
    assert (meta["heights"], meta["blocks"], meta["reorged_blocks"], meta["missing_canonicals"]) == (20, 24, 5, 1)
    assert meta["missing_canonical_heights"] == "12"
    assert meta["heights_per_second"] > 0
    outcomes = check_outcomes(result)
    assert len(outcomes) == 4 and all(o.passed for o in outcomes.values()), outcomes


def test_height_larger_than_one_query_page(instance, dynamodb, block_table, target):
    padding = {"payload": {"S": "x" * 300_000}}  # five items of 300 KB: the Query needs two pages
    items = linear_chain(0, 3) + [orphan(3, b, **padding) for b in range(1, 5)] + canonical_pair(3, **padding)
    seed(dynamodb, block_table, items + linear_chain(4, 6))

    result = materialize_range(instance, 0, 6)

    assert result.success
    assert len(blocks_by_height(target, 3)) == 5
    assert canonical_hash(target, 3)[0] == block_hash(TAG, 3)


def snapshot(conn):
    return (
        conn.execute("SELECT * FROM block_metadata ORDER BY id").fetchall(),
        conn.execute("SELECT * FROM canonical_blocks ORDER BY height").fetchall(),
    )


def test_rerunning_a_partition_changes_nothing(instance, dynamodb, block_table, target):
    seed(dynamodb, block_table, list(sample_chain(TAG, 0, 400, reorg_rate=0.1, skip_rate=0.05)))
    assert materialize_range(instance, 0, 400).success
    before = snapshot(target)
    assert materialize_range(instance, 0, 400).success
    assert snapshot(target) == before
    assert len(before[0]) > 400


def test_reorg_moves_canonical_to_the_new_winner(instance, dynamodb, block_table, target):
    seed(dynamodb, block_table, linear_chain(0, 10))
    assert materialize_range(instance, 0, 10).success
    old_winner = canonical_hash(target, 9)[0]
    # The source reorgs height 9: a new winner takes the canonical item; the old block stays.
    seed(dynamodb, block_table, canonical_pair(9, branch=1))
    assert materialize_range(instance, 0, 10).success
    assert canonical_hash(target, 9)[0] == block_hash(TAG, 9, 1) != old_winner
    assert {row[1] for row in blocks_by_height(target, 9)} == {old_winner, block_hash(TAG, 9, 1)}


def test_malformed_item_fails_the_partition_naming_it(instance, dynamodb, block_table, target):
    bad = block_item(TAG, 3, "0xbad", hash="0xbad")
    del bad["height"]
    seed(dynamodb, block_table, linear_chain(0, 3) + [bad])
    result = materialize_range(instance, 0, 5)
    assert not result.success
    assert f"malformed block item 1-3/0xbad in table {block_table}: missing attribute 'height'" in failure_text(result)


@pytest.mark.parametrize("heights", [(0, 1), (0, 7)])
def test_heights_past_the_source_are_counted_empty(instance, dynamodb, block_table, target, heights):
    seed(dynamodb, block_table, linear_chain(0, 1))
    result = materialize_range(instance, *heights)
    assert result.success
    meta = materialization_metadata(result)
    assert meta["empty_heights"] == heights[1] - 1


def test_worker_processes_read_exactly_what_threads_read(dynamodb, block_table):
    from migration_assets.chain.blocks import BlockRangeRequest, read_heights
    from migration_assets.chain.resources import ChainSourceResource

    seed(dynamodb, block_table, list(sample_chain(TAG, 0, 1500, reorg_rate=0.1, skip_rate=0.05)))
    spec = ChainSourceResource().client_spec()
    threads = BlockRangeRequest(dynamodb, block_table, TAG, 0, 1500, read_processes=1)
    processes = BlockRangeRequest(dynamodb, block_table, TAG, 0, 1500, read_processes=2, client_spec=spec)
    assert list(read_heights(processes, 1500)) == list(read_heights(threads, 1500))


def test_worker_processes_report_a_malformed_item(dynamodb, block_table):
    from migration_assets.chain.blocks import BlockRangeRequest, read_heights
    from migration_assets.chain.resources import ChainSourceResource
    from migration_assets.chain.source import SourceDataError

    items = list(sample_chain(TAG, 0, 1200))
    bad = next(i for i in items if i["block_pid"]["S"] == f"{TAG}-1100" and i["block_rid"]["S"] != "canonical")
    del bad["tag"]
    seed(dynamodb, block_table, items)
    request = BlockRangeRequest(dynamodb, block_table, TAG, 0, 1200, read_processes=2,
                                client_spec=ChainSourceResource().client_spec())
    with pytest.raises(SourceDataError, match=f"malformed block item {TAG}-1100/.*missing attribute 'tag'"):
        list(read_heights(request, 1200))


def test_a_block_run_throttled_once_is_tried_again_and_a_malformed_item_is_not(instance, dynalite, dynamodb,
                                                                              block_table, target, monkeypatch):
    """A throttled Query past botocore's own tries failed the range for good (the block asset had no retry
    policy), and the sync sensor never asked for it again. A malformed item still fails at once."""
    quick_sync_retries(monkeypatch, block_metadata)
    seed(dynamodb, block_table, linear_chain(0, 10))
    attempts = []

    def throttled_in_the_first_attempt(headers, request, response):
        target = headers.get("X-Amz-Target", "")
        if target.endswith(".GetItem"):  # each try of the step starts with the watermark
            attempts.append(1)
        return THROTTLED if target.endswith(".Query") and len(attempts) == 1 else response

    with fault_proxy(dynalite, throttled_in_the_first_attempt) as proxy_url:
        result = materialize_range(instance, 0, 10, chain_source=ChainSourceResource(endpoint_url=proxy_url, max_attempts=1))
    assert result.success, failure_text(result)
    assert step_retries(result) == 1 and len(attempts) == 2, (len(attempts), retry_reasons(result))
    assert len(blocks_by_height(target, 9)) == 1

    seed(dynamodb, block_table, [{**linear_chain(10, 11)[0], "height": {"S": "10"}}])
    malformed = materialize_range(instance, 10, 20)
    assert not malformed.success and step_retries(malformed) == 0 and "must be an integer" in failure_text(malformed)


def test_a_range_past_the_tip_fails_saying_there_is_nothing_to_read_yet(instance, dynamodb, block_table, target):
    """Before, it materialized with no block and every check passing: a green partition with no data."""
    seed(dynamodb, block_table, list(sample_chain(TAG, 0, 12)))
    result = materialize_range(instance, 20, 30)
    assert not result.success and step_retries(result) == 0
    assert "heights [20, 30) are past the chain's tip (height 11): nothing to read yet" in failure_text(result)
