"""One door to AWS for every `edge-fleet` command: clients built once, errors made into one line, dry runs.

Every request goes through `Aws.call`, so three things hold everywhere: a boto3 failure (no credentials,
missing bucket, refused permission) becomes a `CloudError` naming the call and the fix; `--endpoint-url`
(or AWS's own AWS_ENDPOINT_URL) points every service at one stand-in (moto in the tests); and `--dry-run`
records each request that would change something (and answers it with placeholders shaped like AWS's
reply) while reads still run, so the printed plan is exactly what a real run would send to this account.
The region is --region, else AWS_REGION, else AWS_DEFAULT_REGION or the profile's (the AWS CLI's order).
"""

from __future__ import annotations

import http
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from agent.errors import AgentError

# Operations that only read: they run even in a dry run, so the plan reflects the account's real state.
READ_ONLY = ("Describe", "Get", "List", "Head", "Search")
# Error codes that mean "does not exist" (IoT, S3 HeadObject/HeadBucket, iot-data shadows, Greengrass).
NOT_FOUND = {"ResourceNotFoundException", "NoSuchBucket", "NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedException", "UnrecognizedClientException", "InvalidClientTokenId", "ExpiredToken", "ExpiredTokenException", "403"}


ENDPOINT_ADVICE = "check --region, --endpoint-url (or AWS_ENDPOINT_URL), the network and any proxy"


def _status_text(status: int | None) -> str:
    """404 -> '404 Not Found'."""
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


class CloudError(AgentError):
    """An AWS request that failed or could not be made; one line naming the call and the fix."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class AwsOptions:
    """Where requests go: the operator's profile and region, or a stand-in endpoint (moto)."""

    region: str | None = None
    profile: str | None = None
    endpoint_url: str | None = None
    dry_run: bool = False


def _stand_in(shape: Any, name: str) -> Any:
    """A placeholder reply shaped like AWS's, for a request a dry run did not send."""
    if shape is None:
        return {}
    if shape.type_name == "structure":
        return {member: _stand_in(sub, member) for member, sub in shape.members.items()}
    if shape.type_name == "string":
        return f"<{name}>"
    return None


@dataclass
class Aws:
    """boto3 clients (one per service, made on first use) and the log of requests a dry run held back."""

    options: AwsOptions = AwsOptions()
    planned: list[dict[str, Any]] = field(default_factory=list)
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _session: Any = field(default=None, repr=False)

    @property
    def session(self):
        """The boto3 session; made first by every request, so a missing `fleet` extra is one line, not a traceback."""
        if self._session is None:
            try:
                import boto3
                import botocore.exceptions
                import tqdm  # noqa: F401 -- the upload progress bar; part of the same extra
            except ImportError as missing:
                raise CloudError(f"{missing.name} is not installed; install the operator tools with `pip install 'edge-agent[fleet]'`") from None

            region = self.options.region or os.environ.get("AWS_REGION") or None  # botocore itself reads only AWS_DEFAULT_REGION
            try:
                self._session = boto3.Session(profile_name=self.options.profile, region_name=region)
            except botocore.exceptions.ProfileNotFound:
                raise CloudError(f"AWS profile {self.options.profile!r} not found; check --profile against ~/.aws/config") from None
        return self._session

    @property
    def region(self) -> str:
        region = self.session.region_name
        if not region:
            raise CloudError("no AWS region set; pass --region or set AWS_REGION (or a region in the profile)")
        return region

    def client(self, service: str):
        """The boto3 client for `service`; iot-data is pointed at this account's own ATS data endpoint unless
        an endpoint is configured (--endpoint-url, AWS_ENDPOINT_URL[_IOT_DATA] or the profile's endpoint_url)."""
        if service not in self._clients:
            session = self.session
            from botocore.config import Config

            endpoint = self.options.endpoint_url
            if service == "iot-data" and endpoint is None and self.configured_endpoint(service) is None:
                endpoint = "https://" + self.call("iot", "describe_endpoint", endpointType="iot:Data-ATS")["endpointAddress"]
            config = Config(retries={"mode": "standard", "max_attempts": 5}, user_agent_extra="edge-fleet")
            self._clients[service] = session.client(service, region_name=self.region, endpoint_url=endpoint, config=config)
        return self._clients[service]

    def configured_endpoint(self, service: str) -> str | None:
        """The endpoint AWS's own configuration names for `service`, found the way botocore finds it."""
        from botocore.configprovider import ConfiguredEndpointProvider

        core = self.session._session  # boto3's botocore session: the one the clients read their configuration from
        if core.get_config_variable("ignore_configured_endpoint_urls"):
            return None
        return ConfiguredEndpointProvider(full_config=core.full_config, scoped_config=core.get_scoped_config(), client_name=service).provide()

    def operation(self, service: str, method: str) -> str:
        """boto3 method name -> AWS operation name (create_thing -> CreateThing)."""
        return self.client(service).meta.method_to_api_mapping[method]

    def record(self, service: str, operation: str, params: dict[str, Any]) -> None:
        self.planned.append({"service": service, "operation": operation, "params": params})

    def call(self, service: str, method: str, *, fix: str | None = None, **params: Any) -> dict[str, Any]:
        """One request. In a dry run a request that changes something is recorded and answered with placeholders.

        `fix` is the advice given when the call fails because something does not exist.
        """
        client = self.client(service)
        operation = self.operation(service, method)
        if self.options.dry_run and not operation.startswith(READ_ONLY):
            self.record(service, operation, params)
            return _stand_in(client.meta.service_model.operation_model(operation).output_shape, operation)
        with self.translating(service, operation, fix):
            response = getattr(client, method)(**params)
        response.pop("ResponseMetadata", None)
        return response

    def pages(self, service: str, method: str, key: str, **params: Any) -> list[Any]:
        """Every item under `key` across all pages of a List*/Search* call."""
        operation = self.operation(service, method)
        items: list[Any] = []
        with self.translating(service, operation):
            for page in self.client(service).get_paginator(method).paginate(**params):
                items.extend(page.get(key, []))
        return items

    def exists(self, service: str, method: str, **params: Any) -> dict[str, Any] | None:
        """The reply of a Describe/Get/Head call, or None when the thing asked about does not exist."""
        try:
            return self.call(service, method, **params)
        except CloudError as error:
            if error.code in NOT_FOUND:
                return None
            raise

    @contextmanager
    def translating(self, service: str, operation: str, fix: str | None = None) -> Iterator[None]:
        """boto3/botocore exceptions -> CloudError with one line: which call, what AWS said, what to do."""
        import botocore.exceptions as bx
        from botocore.parsers import ResponseParserError

        try:
            yield
        except bx.ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(error.get("Code") or status or "error")
            message = " ".join(str(error.get("Message") or "").split()) or "no message"
            if message.startswith("<"):  # a web page (a wrong endpoint, a proxy), not an AWS error: never quote it
                raise CloudError(f"AWS {service} {operation} failed: HTTP {_status_text(status)} from {self.client(service).meta.endpoint_url}, which does not answer as AWS does; {ENDPOINT_ADVICE}", code) from None
            if code in DENIED:
                advice = f"check the credentials in use and that their IAM policy allows {service.split('-')[0]}:{operation}"
            elif code in NOT_FOUND:
                advice = fix or "check the name you passed"
            else:
                advice = "fix the request or retry later"
            raise CloudError(f"AWS {service} {operation} failed: {code}: {message}; {advice}", code) from None
        except bx.NoCredentialsError:
            raise CloudError("no AWS credentials found; run `aws configure` (or `aws sso login`), set AWS_PROFILE, or pass --profile") from None
        except bx.NoRegionError:
            raise CloudError("no AWS region set; pass --region or set AWS_REGION (or a region in the profile)") from None
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError) as exc:
            raise CloudError(f"AWS {service} {operation}: cannot reach {getattr(exc, 'kwargs', {}).get('endpoint_url', 'the endpoint')}; {ENDPOINT_ADVICE}") from None
        except ResponseParserError:
            raise CloudError(f"AWS {service} {operation}: {self.client(service).meta.endpoint_url} answered with something that is not an AWS reply; {ENDPOINT_ADVICE}") from None
        except bx.ParamValidationError as exc:
            raise CloudError(f"AWS {service} {operation}: invalid request ({' '.join(str(exc).split())}); fix the value named") from None
        except bx.BotoCoreError as exc:
            raise CloudError(f"AWS {service} {operation}: {' '.join(str(exc).split())}") from None

