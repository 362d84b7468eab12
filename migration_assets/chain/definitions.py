"""The chain pipeline's definitions: one set (assets, partitions, checks, sync sensor) per network."""

from dataclasses import dataclass
from functools import cache

import dagster as dg

from migration_assets.chain import assets, partitions, sensors
from migration_assets.chain import assets_scan
from migration_assets.chain.scan import BLOCKS, EVENTS
from migration_assets.chain.settings import ChainSettings, NetworkConfig, configured_networks
from migration_assets.core.settings import settings_of


@dataclass(frozen=True)
class NetworkAssets:
    network: NetworkConfig
    block_ranges: dg.DynamicPartitionsDefinition
    event_ranges: dg.DynamicPartitionsDefinition
    block_metadata: dg.AssetsDefinition
    block_events: dg.AssetsDefinition
    block_scan: dg.AssetsDefinition
    event_scan: dg.AssetsDefinition
    sync: dg.SensorDefinition

    def definitions(self) -> dg.Definitions:
        assets = [self.block_metadata, self.block_events, self.block_scan, self.event_scan]
        return dg.Definitions(assets=assets, sensors=[self.sync])


@cache
def network_assets(network: NetworkConfig) -> NetworkAssets:
    """One network's chain definitions; the one configured the old way is the module-level objects
    other modules import, under their unprefixed names."""
    if network.name is None:
        return NetworkAssets(network, partitions.block_ranges, partitions.event_ranges, assets.block_metadata,
                             assets.block_events, assets_scan.block_scan, assets_scan.event_scan, sensors.chain_sync)
    block_ranges, event_ranges = partitions.range_partitions(network)
    block_metadata, block_events = assets.chain_assets(network, block_ranges, event_ranges)
    sync = sensors.chain_sync_sensor(network, block_ranges, event_ranges)
    scans = assets_scan.scan_asset(network, BLOCKS), assets_scan.scan_asset(network, EVENTS)
    return NetworkAssets(network, block_ranges, event_ranges, block_metadata, block_events, *scans, sync)


def chain_definitions(settings: ChainSettings) -> dg.Definitions:
    return dg.Definitions.merge(*(network_assets(network).definitions() for network in configured_networks(settings)))


defs = chain_definitions(settings_of(ChainSettings))
