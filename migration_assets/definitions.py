"""`defs`: every pipeline's definitions, with the resources they share."""

import dagster as dg

from migration_assets.chain import definitions as chain
from migration_assets.chain.resources import ChainSourceResource
from migration_assets.core.postgres import PostgresResource


def shared_resources() -> dict:
    return {"postgres": PostgresResource(), "chain_source": ChainSourceResource()}


defs = dg.Definitions.merge(chain.defs, dg.Definitions(resources=shared_resources()))
