"""The local source servers survive what tests do to their clients."""

import socket
import time

import boto3

from migration_assets.devstack.servers import start_dynalite


def test_dynalite_survives_a_client_killed_mid_request():
    server = start_dynalite()
    try:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as conn:  # a request body cut short
            conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            time.sleep(0.2)
        time.sleep(0.5)
        assert server.process.poll() is None
        client = boto3.client("dynamodb", endpoint_url=server.url, region_name="us-east-1",
                              aws_access_key_id="local", aws_secret_access_key="local")
        assert client.list_tables()["TableNames"] == []
    finally:
        server.stop()
