"""The event asset against real dynalite and PostgreSQL, in both event-table layouts."""

import json

from migration_assets.chain import event_checks
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.devstack.sample_chain import block_hash, sample_chain
from migration_assets.devstack.sample_events import ADDED, REMOVED, chain_events, event_item, watermark_item
from tests.chain.helpers import (
    TAG, check_outcomes, failure_text, linear_chain, materialize_events, materialize_range,
    orphan, quick_sync_retries, seed, step_retries,
)
from tests.fault_proxy import THROTTLED, fault_proxy


def seed_chain(dynamodb, block_table, event_table, heights, **chain_options):
    (events_name, layout) = event_table
    blocks = list(sample_chain(TAG, 0, heights, **chain_options))
    events = list(chain_events(blocks, layout))
    seed(dynamodb, block_table, blocks)
    seed(dynamodb, events_name, events)
    return blocks, events[:-1]  # the last item is the watermark


def stored_events(conn):
    return conn.execute(
        "SELECT e.event_sequence, e.event_type::text, e.height, e.hash, bm.hash, bm.height, bm.skipped"
        " FROM block_events e JOIN block_metadata bm ON bm.id = e.block_metadata_id ORDER BY 1"
    ).fetchall()


def test_events_of_both_layouts_land_on_their_blocks(instance, dynamodb, block_table, event_table, target):
    blocks, events = seed_chain(dynamodb, block_table, event_table, 300, reorg_rate=0.1, skip_rate=0.05)
    assert materialize_range(instance, 0, 300).success

    result = materialize_events(instance, 0, 1000)

    assert result.success, failure_text(result)
    rows = stored_events(target)
    assert [row[0] for row in rows] == list(range(1, len(events) + 1))
    for (seq, kind, height, hash_, block_hash_, block_height, skipped), source in zip(rows, events):
        assert height == block_height == int(source["height"]["N"])
        assert kind == ("BLOCK_ADDED" if source["type"]["N"] == "1" else "BLOCK_REMOVED")
        assert skipped or hash_ == block_hash_ == source["hash"]["S"]
    assert any(row[6] for row in rows), "skipped blocks resolve by height"
    assert any(row[1] == "BLOCK_REMOVED" for row in rows)
    outcomes = check_outcomes(result)
    assert set(outcomes) == set(event_checks.EVENT_CHECK_NAMES)
    assert all(o.passed for o in outcomes.values()), {n: o.description for n, o in outcomes.items()}
    meta = {k: v.value for k, v in result.asset_materializations_for_node("chain__block_events")[0].metadata.items()}
    assert meta["events"] == len(events) and meta["ids_read"] == f"1-{len(events)}"


def test_a_deep_reorg_sequence_follows_the_rules(instance, dynamodb, block_table, event_table, target):
    events_name, layout = event_table
    # Heights 5-6 first get blocks of branch 1, then the chain reorgs to branch 0.
    a5 = orphan(5, 1)
    a6 = orphan(6, 1)
    a6["parent_hash"] = {"S": block_hash(TAG, 5, 1)}
    blocks = linear_chain(0, 5) + [a5, a6] + linear_chain(5, 8)
    seed(dynamodb, block_table, blocks)
    canonical = {int(b["height"]["N"]): b for b in blocks if b["block_rid"]["S"] == "canonical"}
    story = [(ADDED, canonical[h]) for h in range(5)] + [
        (ADDED, a5), (ADDED, a6), (REMOVED, a6), (REMOVED, a5),
    ] + [(ADDED, canonical[h]) for h in range(5, 8)]
    items = [event_item(layout, seq, kind, block) for seq, (kind, block) in enumerate(story, start=1)]
    seed(dynamodb, events_name, items + [watermark_item(layout, len(items))])
    assert materialize_range(instance, 0, 8).success

    result = materialize_events(instance, 0, 100)

    assert result.success, failure_text(result)
    assert len(stored_events(target)) == len(story)
    assert all(o.passed for o in check_outcomes(result).values())


def test_events_without_their_blocks_fail_naming_them(instance, dynamodb, block_table, event_table, target):
    blocks, events = seed_chain(dynamodb, block_table, event_table, 40)
    assert materialize_range(instance, 0, 30).success  # heights 30-39 not migrated

    result = materialize_events(instance, 0, 1000)

    assert not result.success
    text = failure_text(result)
    assert "10 blocks referenced by events are not in block_metadata" in text
    assert f"(30, '{block_hash(TAG, 30)}')" in text
    assert "Migrate those heights' blocks first" in text and "--start-height 30 --end-height 40" in text
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"], "a manual run fails at once"
    assert not [row for row in stored_events(target) if row[2] >= 30], "no event is stored without its block"


def test_a_gap_in_event_ids_fails_naming_the_ids(instance, dynamodb, block_table, event_table, target):
    events_name, layout = event_table
    blocks, events = seed_chain(dynamodb, block_table, event_table, 30)
    dynamodb.delete_item(TableName=events_name, Key=layout.key(7))
    dynamodb.delete_item(TableName=events_name, Key=layout.key(8))
    assert materialize_range(instance, 0, 30).success

    result = materialize_events(instance, 0, 1000)

    assert not result.success
    assert "no events with ids 7, 8" in failure_text(result)


def test_rerun_is_idempotent_and_the_tip_range_is_read_to_the_watermark(instance, dynamodb, block_table, event_table, target):
    events_name, layout = event_table
    blocks, events = seed_chain(dynamodb, block_table, event_table, 50)
    assert materialize_range(instance, 0, 50).success
    assert materialize_events(instance, 0, 1000).success
    before = stored_events(target)
    assert materialize_events(instance, 0, 1000).success
    assert stored_events(target) == before and len(before) == len(events)


def test_unprocessed_keys_are_retried(instance, dynalite, dynamodb, block_table, event_table, target):
    blocks, events = seed_chain(dynamodb, block_table, event_table, 60)
    assert materialize_range(instance, 0, 60).success
    throttled = {"calls": 0}

    def unprocess_half(headers, request, response):
        if "BatchGetItem" not in headers.get("X-Amz-Target", ""):
            return response
        throttled["calls"] += 1
        if throttled["calls"] % 2 == 0:
            return response
        reply, asked = json.loads(response), json.loads(request)
        [(table, got)] = reply["Responses"].items()
        kept = got[: len(got) // 2]
        kept_ids = {json.dumps(item["event_id"], sort_keys=True) for item in kept}
        keys = [k for k in asked["RequestItems"][table]["Keys"] if json.dumps(k["event_id"], sort_keys=True) not in kept_ids]
        reply["Responses"][table] = kept
        reply["UnprocessedKeys"] = {table: {"Keys": keys, "ConsistentRead": True}} if keys else {}
        return json.dumps(reply).encode()

    with fault_proxy(dynalite, unprocess_half) as proxy_url:
        result = materialize_events(instance, 0, 1000, chain_source=ChainSourceResource(endpoint_url=proxy_url))

    assert result.success, failure_text(result)
    assert throttled["calls"] >= 2
    assert len(stored_events(target)) == len(events)


def test_event_checks_fail_on_broken_data(instance, dynamodb, block_table, event_table, target):
    events_name, layout = event_table
    blocks, events = seed_chain(dynamodb, block_table, event_table, 30, reorg_rate=0.3)
    assert materialize_range(instance, 0, 30).success
    result = materialize_events(instance, 0, 1000)
    assert result.success
    tag = layout.event_tag
    total = len(events)

    count = event_checks.check_event_count(target, tag, 0, 1000, total + 1)
    assert not count.passed and f"block_events holds {total} events" in count.summary

    target.execute("DELETE FROM block_events WHERE event_sequence = 10")
    contiguous = event_checks.check_contiguous(target, tag, 0, 1000)
    assert not contiguous.passed and "missing ids 10" in contiguous.summary

    target.execute(
        "UPDATE block_events SET block_metadata_id = (SELECT id FROM block_metadata WHERE height = 0 LIMIT 1)"
        " WHERE event_sequence = 12"
    )
    resolve = event_checks.check_events_resolve(target, tag, 0, 1000)
    assert not resolve.passed and "(12, " in resolve.summary

    last_height = int(events[-1]["height"]["N"])
    target.execute(
        "UPDATE canonical_blocks SET block_metadata_id = (SELECT id FROM block_metadata WHERE height = 1 LIMIT 1)"
        " WHERE height = %s", (last_height,),
    )
    last = event_checks.check_last_event_canonical(target, tag, 0, 1000)
    assert not last.passed and last.severity == "WARN" and f"({last_height}, {total}, 'BLOCK_ADDED')" in last.summary


def test_rule_check_warns_on_a_suspicious_source(instance, dynamodb, block_table, event_table, target):
    events_name, layout = event_table
    blocks = linear_chain(0, 6)
    seed(dynamodb, block_table, blocks)
    canonical = [b for b in blocks if b["block_rid"]["S"] == "canonical"]
    story = [(ADDED, canonical[0]), (ADDED, canonical[1]), (ADDED, canonical[3]), (REMOVED, canonical[3]), (REMOVED, canonical[1])]
    items = [event_item(layout, seq, kind, block) for seq, (kind, block) in enumerate(story, start=1)]
    seed(dynamodb, events_name, items + [watermark_item(layout, len(items))])
    assert materialize_range(instance, 0, 6).success

    result = materialize_events(instance, 0, 100)

    assert result.success  # WARN: the migration is faithful, the source is suspicious
    rules = check_outcomes(result)[event_checks.CHECK_EVENT_RULES]
    assert not rules.passed and rules.severity.value == "WARN"
    assert "event 3 at height 3: added after an add at height 1" in rules.description
    assert "event 5 at height 1: removed after a removal at 3" in rules.description


def test_a_synced_event_run_waits_for_its_blocks_instead_of_failing(
    instance, dynalite, dynamodb, block_table, event_table, target, monkeypatch
):
    from migration_assets.chain.assets import SYNC_TAG
    from migration_assets.chain.blocks import BlockRangeRequest, migrate_block_range
    from migration_assets.core.resources import PostgresResource

    quick_sync_retries(monkeypatch)
    events_name, _ = event_table
    blocks, events = seed_chain(dynamodb, block_table, event_table, 20)  # no block migrated yet
    attempts = {"started": 0}

    def land_blocks_when_the_retry_starts(headers, request, response):
        # Each attempt of the step starts with one GetItem: the event table's watermark.
        if headers.get("X-Amz-Target", "").endswith(".GetItem") and events_name in request.decode():
            attempts["started"] += 1
            if attempts["started"] == 2:  # the first retry: the blocks' own run lands them now
                migrate_block_range(BlockRangeRequest(dynamodb, block_table, TAG, 0, 20), PostgresResource().pool())
        return response

    with fault_proxy(dynalite, land_blocks_when_the_retry_starts) as proxy_url:
        result = materialize_events(instance, 0, 1000, tags={SYNC_TAG: "tip"},
                                    chain_source=ChainSourceResource(endpoint_url=proxy_url))

    assert result.success, failure_text(result)
    assert step_retries(result) == 1 and attempts["started"] == 2
    rows = stored_events(target)
    assert [row[0] for row in rows] == list(range(1, len(events) + 1))
    assert all(skipped or hash_ == block_hash_ for _, _, _, hash_, block_hash_, _, skipped in rows)


def test_a_synced_event_run_gives_up_when_its_blocks_never_land(instance, dynamodb, block_table, event_table, target, monkeypatch):
    from migration_assets.chain.assets import SYNC_RETRY, SYNC_TAG

    quick_sync_retries(monkeypatch)
    seed_chain(dynamodb, block_table, event_table, 20)  # no block migrated yet

    result = materialize_events(instance, 0, 1000, tags={SYNC_TAG: "tip"})

    assert step_retries(result) == SYNC_RETRY.max_retries
    assert not result.success and "Migrate those heights' blocks first" in failure_text(result)


def test_worker_processes_read_exactly_what_threads_read(dynamodb, event_table):
    from migration_assets.chain.event_source import read_events

    events_name, layout = event_table
    blocks = list(sample_chain(TAG, 0, 11_000, reorg_rate=0.05))
    events = list(chain_events(blocks, layout))
    seed(dynamodb, events_name, events)
    end = len(events) + 5  # past the last id: absent ids are simply not returned
    spec = ChainSourceResource().client_spec()

    def flat(batches):
        return [event for batch in batches for event in batch]

    in_threads = flat(read_events(dynamodb, events_name, layout, 1, end, 8))
    in_processes = flat(read_events(dynamodb, events_name, layout, 1, end, 8, processes=2, client_spec=spec))
    assert in_processes == in_threads and len(in_threads) == len(events) - 1


def test_an_event_run_throttled_once_is_tried_again_not_failed_for_good(
    instance, dynalite, dynamodb, block_table, event_table, target, monkeypatch
):
    """DynamoDB throttling past botocore's own tries (here: two tries, both throttled): before,
    it failed the range for good, and the sync sensor, having asked for it once, never asked again."""
    quick_sync_retries(monkeypatch)
    seed_chain(dynamodb, block_table, event_table, 20)
    assert materialize_range(instance, 0, 20).success
    throttled = []

    def throttle_once(headers, request, response):
        if headers.get("X-Amz-Target", "").endswith(".BatchGetItem") and len(throttled) < 2:  # botocore tries twice
            throttled.append(1)
            return THROTTLED
        return response

    with fault_proxy(dynalite, throttle_once) as proxy_url:
        result = materialize_events(instance, 0, 1000, chain_source=ChainSourceResource(endpoint_url=proxy_url,
                                                                                          max_attempts=1))

    assert result.success, failure_text(result)
    assert step_retries(result) == 1 and throttled == [1, 1]


def test_an_event_table_without_a_watermark_fails_saying_there_is_nothing_to_read(
    instance, dynamodb, block_table, event_table, target
):
    """Before, a missing watermark read as 0: the range materialized with no event, every check passing."""
    events_name, layout = event_table
    blocks, events = seed_chain(dynamodb, block_table, event_table, 20)
    assert materialize_range(instance, 0, 20).success
    dynamodb.delete_item(TableName=events_name, Key=layout.watermark_key())
    result = materialize_events(instance, 0, 1000)
    assert not result.success and "it has no event watermark item): nothing to read yet" in failure_text(result)
