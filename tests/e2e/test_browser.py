"""The Dagster UI in a real browser (headless Debian Chromium) after a partition backfill of the
chain's block ranges: the asset graph, a range's partition view with its metadata, and the
per-partition asset-check results — what a user looks at. Screenshots land in tests/artifacts/."""

from collections.abc import Iterator

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from migration_assets.chain.checks import BLOCK_CHECK_NAMES
from tests.e2e.browser import chromium, clear_artifacts, recorded_view, table_rows
from tests.e2e.stack import Stack
from tests.e2e.test_chain_daemon import BLOCK_KEYS, CHECK_EXECUTIONS, backfill

ASSET_PATH = ["chain", "block_metadata"]
ASSET_URL = "/assets/chain/block_metadata"
BACKFILLED = BLOCK_KEYS[:2]
SHOWN = BACKFILLED[1]
MATERIALIZATION_METADATA = """
query($asset: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $asset) { ... on Asset { assetMaterializations(partitions: $partitions, limit: 1) {
    partition
    metadataEntries { label ... on IntMetadataEntry { intValue } ... on FloatMetadataEntry { floatValue }
                      ... on TextMetadataEntry { text } }
  } } }
}"""

PARTITION_STATS = """
query($asset: AssetKeyInput!) {
  assetNodes(assetKeys: [$asset]) { partitionKeys partitionStats { numMaterialized numPartitions numFailed } }
}"""

expect.set_options(timeout=30_000)  # a cold SPA on a busy 2-core machine


@pytest.fixture(scope="module")
def backfilled(stack) -> Stack:
    """The e2e suite's shared demo stack (tests/e2e/conftest.py) with the ranges backfilled. Other
    tests may have added ranges or runs, so what the UI must show is read from the API, not assumed."""
    clear_artifacts("ui-")
    backfill(stack, ASSET_PATH, BACKFILLED)
    return stack


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[BrowserContext]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def page(browser) -> Iterator[Page]:
    page = browser.new_page()
    yield page
    page.close()


def emitted_metadata(stack: Stack, partition: str) -> dict[str, str]:
    """What the asset recorded for the partition, as the API returns it (the UI must show the same)."""
    asset = stack.graphql(MATERIALIZATION_METADATA, asset={"path": ASSET_PATH}, partitions=[partition])["assetOrError"]
    [materialization] = asset["assetMaterializations"]
    entries = materialization["metadataEntries"]
    return {e["label"]: next(str(v) for k, v in e.items() if k != "label") for e in entries}


def partition_stats(stack: Stack) -> dict:
    [node] = stack.graphql(PARTITION_STATS, asset={"path": ASSET_PATH})["assetNodes"]
    return {"keys": node["partitionKeys"], **node["partitionStats"]}


def check_results(stack: Stack, check: str, keys: list[str]) -> dict[str, dict | None]:
    """Each range's latest execution of the check (None: never ran), as the API reports it."""
    results = {}
    for key in keys:
        executions = stack.graphql(CHECK_EXECUTIONS, asset={"path": ASSET_PATH}, check=check, partition=key)
        results[key] = next(iter(executions["assetCheckExecutions"]), None)
    return results


def same_value(displayed: str, emitted: str) -> bool:
    try:
        return float(displayed) == float(emitted)  # the UI may drop a float's trailing ".0"
    except ValueError:
        return displayed == emitted


def test_the_asset_graph_shows_the_chain_assets(backfilled, page):
    stats = partition_stats(backfilled)
    page.goto(backfilled.url)
    with recorded_view(page, "ui-asset-graph"):
        page.get_by_role("link", name="Lineage").click()
        expect(page.get_by_text("Global asset lineage")).to_be_visible()
        nodes = page.locator("foreignObject")  # the graph's asset and group nodes
        blocks = nodes.filter(has=page.get_by_text("block_metadata", exact=True))
        events = nodes.filter(has=page.get_by_text("block_events", exact=True))
        # With several asset groups the graph opens with each group collapsed: open the chain's.
        collapsed_chain = nodes.filter(has=page.get_by_text("chain", exact=True)).filter(
            has=page.get_by_role("img", name="unfold_more"))
        expect(blocks.or_(collapsed_chain)).to_be_visible()
        if collapsed_chain.count():
            collapsed_chain.get_by_role("img", name="unfold_more").click()
        expect(blocks).to_be_visible()
        expect(events).to_be_visible()
        expect(blocks).to_contain_text(f"{len(BLOCK_CHECK_NAMES)} / {len(BLOCK_CHECK_NAMES)} Passed")
        expect(blocks).to_contain_text(f"{stats['numPartitions']} partitions")


def test_a_backfilled_range_shows_its_metadata(backfilled, page):
    stack = backfilled
    stats = partition_stats(stack)
    page.goto(f"{stack.url}{ASSET_URL}?view=partitions")
    with recorded_view(page, "ui-partition"):
        expect(page.get_by_text(f"Materialized ({stats['numMaterialized']})", exact=True)).to_be_visible()
        expect(page.get_by_text("Failed (0)", exact=True)).to_be_visible()
        missing = stats["numPartitions"] - stats["numMaterialized"] - stats["numFailed"]
        expect(page.get_by_text(f"Missing ({missing})", exact=True)).to_be_visible()
        page.locator(f'[title="{SHOWN}"]').first.click()
        expect(page).to_have_url(f"{stack.url}{ASSET_URL}?view=partitions&partition={SHOWN}")
        expect(page.get_by_text("Latest materialization")).to_be_visible()
        expect(page.locator("table")).to_contain_text("dagster/row_count")
        shown = table_rows(page)

        emitted = emitted_metadata(stack, SHOWN)
        assert {"heights", "blocks", "heights_per_second", "dagster/row_count"} <= emitted.keys(), emitted
        for label, value in emitted.items():
            assert label in shown, f"{label} is not in the UI's metadata table: {shown}"
            assert same_value(shown[label], value), (label, shown[label], value)
        assert shown["heights"] == "10000" and shown["heights_read"] == "10000-19999"
        assert shown["dagster/row_count"] == shown["blocks"] and int(shown["blocks"]) >= 10_000
        assert float(shown["heights_per_second"]) > 0


def test_the_checks_tab_shows_every_check_passed_on_each_backfilled_range(backfilled, page):
    stack = backfilled
    keys = partition_stats(stack)["keys"]
    page.goto(f"{stack.url}{ASSET_URL}?view=checks")
    with recorded_view(page, "ui-checks"):
        expect(page.get_by_text(f"Checks ({len(BLOCK_CHECK_NAMES)})", exact=True)).to_be_visible()
        for name in BLOCK_CHECK_NAMES:
            # Each list item holds the check's name and the status of its latest execution.
            expect(page.locator(f'span:has(> div[title="{name}"])')).to_contain_text("Succeeded")
    for name in BLOCK_CHECK_NAMES:
        results = check_results(stack, name, keys)
        assert all(results[key] for key in BACKFILLED), (name, results)
        ran = [r for r in results.values() if r]
        passed = [r for r in ran if r["status"] == "SUCCEEDED" and r["evaluation"]["success"]]
        with recorded_view(page, f"ui-check-{name}"):
            page.locator(f'div[title="{name}"]').first.click()
            expect(page).to_have_url(f"{stack.url}{ASSET_URL}?view=checks&checkDetail={name}")
            check_tabs = page.get_by_role("tablist").filter(has=page.get_by_role("tab", name="Execution history"))
            check_tabs.get_by_role("tab", name="Partitions").click()
            expect(page.get_by_text(f"Passed ({len(passed)})", exact=True)).to_be_visible()
            expect(page.get_by_text("Failed (0)", exact=True)).to_be_visible()
            expect(page.get_by_text("Execution Failed (0)", exact=True)).to_be_visible()
            expect(page.get_by_text(f"Missing ({len(keys) - len(ran)})", exact=True)).to_be_visible()
            # One range's result, as the check reported it: its summary and the Passed status.
            page.locator(f'[title="{SHOWN}"]').last.click()  # the partition list (the first is a filter chip)
            page.mouse.move(0, 0)  # no hover tooltip over the screenshot
            expect(page.get_by_text(results[SHOWN]["evaluation"]["description"], exact=True).first).to_be_visible()
            expect(page.get_by_text("Passed", exact=True)).to_be_visible()
