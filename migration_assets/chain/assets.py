"""Dagster assets of the chain pipeline: a thin shell over `blocks.migrate_block_range`."""

import dagster as dg

from migration_assets.chain import checks
from migration_assets.chain.blocks import BlockRangeRequest, BlockRangeResult, migrate_block_range
from migration_assets.chain.partitions import block_ranges
from migration_assets.chain.ranges import parse_range_key
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.core.dagster_glue import check_result, check_specs
from migration_assets.core.postgres import PostgresResource

BLOCK_METADATA = dg.AssetKey(["chain", "block_metadata"])

_BLOCK_CHECKS = {
    checks.CHECK_BLOCK_COUNT: "block_metadata rows per height = distinct blocks in the source",
    checks.CHECK_CANONICAL: "one canonical_blocks row per height with a canonical item, pointing at it",
    checks.CHECK_CANONICAL_RESOLVES: "no canonical_blocks row without its block_metadata row",
    checks.CHECK_CONTINUITY: "parent-hash continuity along the canonical chain (skipped blocks excluded)",
}


def block_range_metadata(result: BlockRangeResult) -> dict:
    missing = result.missing_canonical
    return {
        "heights": dg.MetadataValue.int(result.heights),
        "blocks": dg.MetadataValue.int(result.blocks),
        "reorged_blocks": dg.MetadataValue.int(result.reorged_blocks),
        "missing_canonicals": dg.MetadataValue.int(len(missing)),
        "missing_canonical_heights": dg.MetadataValue.text(", ".join(map(str, missing[:100])) or "none"),
        "empty_heights": dg.MetadataValue.int(result.empty_heights),
        "heights_per_second": dg.MetadataValue.float(round(result.heights_per_second, 1)),
        "seconds": dg.MetadataValue.float(round(result.seconds, 2)),
        "dagster/row_count": dg.MetadataValue.int(result.blocks),
    }


@dg.asset(
    key=BLOCK_METADATA,
    partitions_def=block_ranges,
    check_specs=check_specs(BLOCK_METADATA, _BLOCK_CHECKS, warn={checks.CHECK_CONTINUITY}),
    group_name="chain",
    kinds={"dynamodb", "postgres"},
    pool="chain_dynamodb",
    description="Every block of each height (reorged ones first, the canonical last) from DynamoDB "
    "into block_metadata, and the canonical one into canonical_blocks.",
)
def block_metadata(
    context: dg.AssetExecutionContext, postgres: PostgresResource, chain_source: ChainSourceResource
) -> dg.MaterializeResult:
    start, end = parse_range_key(context.partition_key)
    settings = chain_source.settings
    request = BlockRangeRequest(
        client=chain_source.client(),
        table=settings.block_table,
        tag=settings.block_tag,
        start=start,
        end=end,
        read_concurrency=chain_source.read_concurrency,
        chunk_heights=settings.load_chunk_heights,
    )

    def progress(result: BlockRangeResult) -> None:
        context.log.info(
            f"{settings.block_table} tag {settings.block_tag}: {result.heights}/{end - start} heights, "
            f"{result.blocks} blocks, {result.reorged_blocks} reorged, "
            f"{len(result.missing_canonical)} without canonical"
        )

    result = migrate_block_range(request, postgres.pool(), on_progress=progress)
    if result.missing_canonical:
        context.log.warning(
            f"{len(result.missing_canonical)} heights have blocks but no canonical item: "
            f"{result.missing_canonical[:20]}"
        )
    return dg.MaterializeResult(
        metadata=block_range_metadata(result),
        check_results=[check_result(outcome) for outcome in result.checks],
    )
