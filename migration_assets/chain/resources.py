"""The DynamoDB source of the chain pipeline, as a Dagster resource."""

from functools import cached_property
from typing import Any

from dagster_aws.utils import ResourceWithBoto3Configuration
from pydantic import Field, PrivateAttr

from migration_assets.core.aws import DynamoClientSpec
from migration_assets.core.settings import ChainSettings


class ChainSourceResource(ResourceWithBoto3Configuration):
    """chainstorage's DynamoDB tables. Unset fields come from the environment (CHAIN_*, AWS_*):
    `endpoint_url` from AWS_ENDPOINT_URL_DYNAMODB, credentials from the standard AWS chain."""

    block_table: str | None = Field(default=None, description="defaults to CHAIN_BLOCK_TABLE")
    block_tag: int | None = Field(default=None, description="defaults to CHAIN_BLOCK_TAG (1)")
    event_table: str | None = Field(default=None, description="defaults to CHAIN_EVENT_TABLE")
    event_tag: int | None = Field(default=None, description="defaults to CHAIN_EVENT_TAG (0)")
    read_concurrency: int = Field(default=16, description="DynamoDB requests in flight per run")
    read_processes: int = Field(
        default=2,
        description="worker processes reading blocks and events; botocore spends ~1 ms of CPU per request, "
        "so at low latency one process's threads are CPU-bound. 1 reads in threads only.",
    )
    max_attempts: int = 10
    _client: Any = PrivateAttr(default=None)

    @cached_property
    def settings(self) -> ChainSettings:
        env = ChainSettings.from_env()
        return env.model_copy(
            update={
                "block_table": self.block_table or env.block_table,
                "block_tag": env.block_tag if self.block_tag is None else self.block_tag,
                "event_table": self.event_table or env.event_table,
                "event_tag": env.event_tag if self.event_tag is None else self.event_tag,
            }
        )

    def client_spec(self) -> DynamoClientSpec:
        return DynamoClientSpec(
            region_name=self.region_name, endpoint_url=self.endpoint_url, profile_name=self.profile_name,
            aws_access_key_id=self.aws_access_key_id, aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token, use_ssl=self.use_ssl, verify=self.verify,
            max_attempts=self.max_attempts, max_pool_connections=self.read_concurrency + 4,
        )

    def client(self) -> Any:
        """One thread-safe boto3 client per resource, its connection pool sized for the concurrency."""
        if self._client is None:
            self._client = self.client_spec().make()
        return self._client
