"""Each block check fails on deliberately broken data, naming the heights; a corrupt source fails the
partition with the seed's message."""

import json

from migration_assets.chain import checks
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.chain.source import CANONICAL_RID
from migration_assets.devstack.sample_chain import block_hash
from tests.chain.helpers import (
    TAG, canonical_pair, check_outcomes, failure_text, linear_chain, materialize_range, orphan, seed,
)
from tests.fault_proxy import fault_proxy


def source_summary(dynamodb, table, start, end):
    from migration_assets.chain.source import read_height

    summary = checks.SourceSummary()
    for height in range(start, end):
        summary.add(read_height(dynamodb, table, TAG, height))
    return summary


def test_all_checks_pass_on_a_faithful_migration(instance, dynamodb, block_table, target):
    seed(dynamodb, block_table, linear_chain(0, 6) + [orphan(6, 1)] + canonical_pair(6))
    result = materialize_range(instance, 0, 7)
    outcomes = check_outcomes(result)
    assert set(outcomes) == set(checks.BLOCK_CHECK_NAMES)
    assert all(o.passed for o in outcomes.values())
    assert {o.partition for o in outcomes.values()} == {"000000000000-000000000007"}  # kept per range


def test_count_check_fails_when_a_block_could_not_be_stored(instance, dynamodb, block_table, target):
    seed(dynamodb, block_table, linear_chain(0, 6))
    # A stray row elsewhere holds height 3's hash, so the unique index keeps height 3's block out.
    target.execute(
        "INSERT INTO block_metadata (height, tag, hash, parent_hash, timestamp) VALUES (900, %s, %s, '', 0)",
        (TAG, block_hash(TAG, 3)),
    )
    result = materialize_range(instance, 0, 6)

    assert not result.success  # ERROR checks are blocking: the run fails
    outcomes = check_outcomes(result)
    count = outcomes[checks.CHECK_BLOCK_COUNT]
    assert not count.passed and "3 (source 1, target 0)" in count.description
    canonical = outcomes[checks.CHECK_CANONICAL]
    assert not canonical.passed and "missing at heights 3" in canonical.description
    assert outcomes[checks.CHECK_CONTINUITY].passed


def test_canonical_check_fails_when_pointing_at_another_block(dynamodb, block_table, target):
    seed(dynamodb, block_table, linear_chain(0, 5) + [orphan(5, 1)] + canonical_pair(5))
    from migration_assets.chain.blocks import BlockRangeRequest, migrate_block_range
    from migration_assets.core.resources import PostgresResource

    migrate_block_range(BlockRangeRequest(dynamodb, block_table, TAG, 0, 6), PostgresResource().pool())
    target.execute(
        "UPDATE canonical_blocks SET block_metadata_id = (SELECT id FROM block_metadata WHERE hash = %s)"
        " WHERE height = 5",
        (block_hash(TAG, 5, 1),),
    )
    outcome = checks.check_canonical(target, TAG, 0, 6, source_summary(dynamodb, block_table, 0, 6))
    assert not outcome.passed and "pointing at another block at heights 5" in outcome.summary


def test_resolve_check_fails_for_a_row_pointing_at_another_height(dynamodb, block_table, target):
    seed(dynamodb, block_table, linear_chain(0, 5))
    from migration_assets.chain.blocks import BlockRangeRequest, migrate_block_range
    from migration_assets.core.resources import PostgresResource

    migrate_block_range(BlockRangeRequest(dynamodb, block_table, TAG, 0, 5), PostgresResource().pool())
    assert checks.check_canonical_resolves(target, TAG, 0, 5).passed
    target.execute(
        "UPDATE canonical_blocks SET block_metadata_id = (SELECT id FROM block_metadata WHERE height = 1)"
        " WHERE height = 4"
    )
    outcome = checks.check_canonical_resolves(target, TAG, 0, 5)
    assert not outcome.passed and "at heights 4" in outcome.summary


def test_continuity_check_warns_at_a_broken_parent_link(instance, dynamodb, block_table, target):
    items = linear_chain(0, 4) + canonical_pair(4, parent_height=3)
    items += [item for item in canonical_pair(5)]
    for item in items[-2:]:
        item["parent_hash"] = {"S": "0xnot-the-parent"}
    seed(dynamodb, block_table, items + linear_chain(6, 8))

    result = materialize_range(instance, 0, 8)

    assert result.success  # a suspicious source is a warning, not a failed migration
    continuity = check_outcomes(result)[checks.CHECK_CONTINUITY]
    assert not continuity.passed
    assert continuity.severity.value == "WARN"
    assert "breaks at heights 5" in continuity.description


def test_continuity_skips_skipped_blocks_and_restarts_after_holes():
    link = checks.ChainLink
    chain = [
        link(1, "a", "", 0, False),
        link(2, None, "", 0, True),  # skipped: the next block's parent is height 1
        link(3, "c", "a", 1, False),
        link(5, "e", "zz", 4, False),  # after a hole at 4: not compared
        link(6, "f", "wrong", 5, False),
        link(7, "g", "f", 0, False),
    ]
    assert checks.continuity_breaks(chain) == [6]


def duplicate_canonical_at(pid: str):
    """Rewrite Query replies for `pid` to hold a second canonical item (a corrupt source)."""

    def rewrite(headers, request, response):
        if "Query" not in headers.get("X-Amz-Target", "") or pid.encode() not in request:
            return response
        reply = json.loads(response)
        canonical = [i for i in reply["Items"] if i["block_rid"]["S"] == CANONICAL_RID]
        reply["Items"] += [{**c, "block_hash": {"S": "0xother"}} for c in canonical]
        reply["Count"] = len(reply["Items"])
        return json.dumps(reply).encode()

    return rewrite


def test_multiple_canonical_items_fail_the_partition(instance, dynalite, dynamodb, block_table, target):
    seed(dynamodb, block_table, linear_chain(0, 6))
    with fault_proxy(dynalite, duplicate_canonical_at(f'"{TAG}-4"')) as proxy_url:
        result = materialize_range(instance, 0, 6, chain_source=ChainSourceResource(endpoint_url=proxy_url))
    assert not result.success
    assert f"multiple canonical blocks found for {TAG}-4" in failure_text(result)
