"""moto in server mode as the AWS account the fleet tests talk to (never real AWS).

One ThreadedMotoServer on a free loopback port for the session, emptied before each test. The `edge-fleet`
processes reach it with --endpoint-url and dummy credentials, with the developer's own AWS configuration
hidden. Device-side facts AWS would record (a job execution that FAILED with a reason) are set in moto's
backend, standing in for the device's Jobs data-plane call, which moto does not implement. moto also lacks
IoT Core's retained messages: `retained_messages` adds them (Publish with retain=true keeps one per topic,
GetRetainedMessage reads it), as AWS documents them.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's account


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def retained_messages() -> None:
    """IoT Core's retained-message store in moto: the newest retained Publish per topic (an empty payload
    clears it), answered by GetRetainedMessage, or ResourceNotFoundException when the topic holds none."""
    import base64
    import json
    import time
    from urllib.parse import unquote

    from moto.iotdata.exceptions import ResourceNotFoundException
    from moto.iotdata.responses import IoTDataPlaneResponse

    if hasattr(IoTDataPlaneResponse, "get_retained_message"):
        return
    plain_publish = IoTDataPlaneResponse.publish

    def store(response) -> dict:
        return vars(response.iotdata_backend).setdefault("retained", {})  # a reset makes new backends: emptied

    def publish(self) -> str:
        if self.querystring.get("retain", ["false"])[0] == "true":
            topic = unquote(self.path.split("/topics/")[-1])
            if self.body:
                store(self)[topic] = (bytes(self.body), int(self.querystring.get("qos", ["0"])[0]), int(time.time() * 1000))
            else:
                store(self).pop(topic, None)
        return plain_publish(self)

    def get_retained_message(self) -> str:
        topic = unquote(self.path.split("/retainedMessage/")[-1])
        if topic not in store(self):
            raise ResourceNotFoundException()
        payload, qos, modified = store(self)[topic]
        return json.dumps({"topic": topic, "payload": base64.b64encode(payload).decode(), "qos": qos, "lastModifiedTime": modified})

    IoTDataPlaneResponse.publish = publish
    IoTDataPlaneResponse.get_retained_message = get_retained_message


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    retained_messages()
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(tmp_path_factory, monkeypatch) -> dict[str, str]:
    """Environment for boto3 here and in CLI processes: dummy credentials, no developer config.

    The region is AWS_REGION, as the runbook tells operators to set it (boto3 alone reads only
    AWS_DEFAULT_REGION, which is removed so that a command ignoring AWS_REGION fails here).
    """
    home = tmp_path_factory.mktemp("aws-home")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def aws(moto_server, aws_env) -> str:
    """A fresh, empty account at the returned endpoint URL."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=10).read()
    return moto_server


def client(endpoint: str, service: str, region: str = REGION):
    import boto3

    return boto3.client(service, region_name=region, endpoint_url=endpoint)


def set_job_execution(job_id: str, thing: str, status: str, details: dict[str, str] | None = None) -> None:
    """What a device's UpdateJobExecution would leave in IoT Jobs (moto lacks the Jobs data plane)."""
    from moto.iot.models import iot_backends

    execution = iot_backends[ACCOUNT][REGION].job_executions[(job_id, thing)]
    execution.status = status
    execution.status_details_map = details or {}
