"""AWS clients built from a picklable recipe, so worker processes can build their own."""

import json
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import boto3
from botocore.config import Config


@dataclass(frozen=True)
class DynamoClientSpec:
    """How to build a DynamoDB client: picklable, so worker processes can build their own."""

    region_name: str | None = None
    endpoint_url: str | None = None
    profile_name: str | None = None
    aws_access_key_id: str | None = field(default=None, repr=False)  # secrets stay out of logs
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    use_ssl: bool = True
    verify: bool | None = True
    max_attempts: int = 10
    max_pool_connections: int = 20

    def make(self) -> Any:
        session = boto3.session.Session(
            profile_name=self.profile_name,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
        )
        return session.client(
            "dynamodb", region_name=self.region_name, endpoint_url=self.endpoint_url,
            use_ssl=self.use_ssl, verify=self.verify,
            config=Config(
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                max_pool_connections=self.max_pool_connections,
                # Request validation costs ~10% of botocore's per-request CPU, which bounds read rates.
                parameter_validation=False,
            ),
        )


@cache
def cached_client(spec: DynamoClientSpec) -> Any:
    """One client per spec per process: worker processes build theirs on first use."""
    return spec.make()


_BINARY = re.compile(rb'"(B|BS)"\s*:')  # types botocore decodes (base64 to bytes); the wire keeps text


def _wire_items(response_dict: dict, customized_response_dict: dict, **_: Any) -> None:
    """A `before-parse` handler: a successful response's Items as the wire JSON holds them, which is
    the form botocore's parser makes of them too (N as text, BOOL as bool), unless they hold binary
    values. Only the rest of the body (keys, counts, consumed capacity) goes through the parser."""
    body = response_dict.get("body")
    if response_dict.get("status_code") != 200 or not body or _BINARY.search(body):
        return
    data = json.loads(body)
    if "Items" in data:
        customized_response_dict["Items"] = data.pop("Items")
        response_dict["body"] = json.dumps(data).encode()


def read_items_from_wire(client: Any, operation: str = "Scan") -> Any:
    """Let the client skip botocore's parse of `operation`'s Items: its walk of the response shape,
    attribute by attribute, costs about half of a Scan reader's CPU (profiled on dynalite). Same
    items, same errors and retries; idempotent. Returns the client."""
    client.meta.events.register(
        f"before-parse.dynamodb.{operation}", _wire_items, unique_id=f"migration-assets-wire-items-{operation}"
    )
    return client
