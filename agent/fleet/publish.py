"""`edge-fleet model publish`, first half: a bundle checked, signed and uploaded where devices can fetch it.

The bundle is zipped (reproducibly) and verified against the operator's signing key before anything goes
to S3; an unsigned bundle, or one signed by a development key shipped with the agent (the model devices
start with), is signed with the operator's key on a copy, never in place. The zip lands under a
content-addressed key (`models/<name>/<sha256>/<file name>`), so a repeat upload is skipped and a key always
means the same bytes. Beside
it goes a release record (`models/<name>/versions/<version>.json`: the signed job document's fields), which
is how `model rollback` finds an older version's artifact without re-uploading anything.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from agent.bundles.bundle import SIGNATURE, open_bundle, sha256_file
from agent.bundles.document import ModelUpdate, ShadowPlan, document_signed_bytes
from agent.bundles.signing import Signature, key_id, load_private_key, load_public_key, sign
from agent.errors import ModelError
from agent.fleet.aws import Aws
from agent.fleet.packing import OPERATOR_MAX_BYTES, sign_bundle, write_zip
from agent.settings import DEV_SIGNING_KEYS


@dataclass(frozen=True)
class Release:
    """A model version as uploaded: what a job document or component recipe needs to point at it."""

    name: str
    version: str
    sha256: str
    size: int
    signature: Signature
    bucket: str
    key: str

    def s3_url(self, region: str) -> str:
        return f"https://s3.{region}.amazonaws.com/{self.bucket}/{self.key}"

    def document(self, region: str, allow_downgrade: bool = False, shadow: ShadowPlan | None = None) -> ModelUpdate:
        """The IoT Jobs document; IoT Core swaps the placeholder for a presigned URL on delivery. With
        `shadow`, devices evaluate the model beside the one they serve instead of serving it."""
        return ModelUpdate(
            operation="model-update",
            name=self.name,
            version=self.version,
            url="${aws:iot:s3-presigned-url-v2:" + self.s3_url(region) + "}",
            sha256=self.sha256,
            size=self.size,
            signature=self.signature,
            allow_downgrade=allow_downgrade,
            mode="shadow" if shadow is not None else "serve",
            shadow=shadow,
        )


def record_key(name: str, version: str) -> str:
    return f"models/{name}/versions/{version}.json"


def prepare(bundle: Path, signing_key: Path, workdir: Path, bucket: str, file_name: str = "bundle.zip") -> tuple[Path, Release]:
    """The bundle as a signed, verified .zip in workdir, and the release it will be once in `bucket`.

    `file_name` is the zip's name in S3 (a Greengrass recipe fixes it: the nucleus unpacks to a folder of that name).
    """
    bundle = Path(bundle)
    key = load_private_key(signing_key)
    public = workdir / "signing.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    artifact = workdir / "bundle.zip"
    if bundle.is_dir():
        write_zip(bundle, artifact)
    elif bundle.is_file():
        shutil.copyfile(bundle, artifact)
    else:
        raise ModelError(f"{bundle}: no such bundle; pass a bundle directory or .zip")
    operator = key_id(key.public_key())
    signer = _named_signer(artifact)
    development = {key_id(load_public_key(path)) for path in DEV_SIGNING_KEYS}
    if signer not in {None, operator, *development}:
        raise ModelError(f"{bundle}: signed by key {signer}, not by --signing-key {signing_key} (key {operator}); pass the key that signed it, or publish an unsigned copy, which is signed for you")
    checked = open_bundle(artifact, trusted_keys=[public, *DEV_SIGNING_KEYS], require_signature=False, max_bytes=OPERATOR_MAX_BYTES)
    if checked.signer != operator:
        sign_bundle(artifact, signing_key)
        checked = open_bundle(artifact, trusted_keys=[public], max_bytes=OPERATOR_MAX_BYTES)
    manifest = checked.manifest
    sha256, size = sha256_file(artifact), artifact.stat().st_size
    signature = Signature.model_validate_json(sign(document_signed_bytes(manifest.name, manifest.version, sha256, size), key))
    release = Release(manifest.name, manifest.version, sha256, size, signature, bucket, f"models/{manifest.name}/{sha256}/{file_name}")
    return artifact, release


def _named_signer(zip_path: Path) -> str | None:
    """The key id a bundle zip's manifest.sig names (not yet verified), or None if it has none to read."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            return Signature.model_validate_json(archive.read(SIGNATURE)).key_id
    except (KeyError, zipfile.BadZipFile, ValidationError):
        return None  # unsigned, or unreadable: open_bundle says which


def upload(aws: Aws, artifact: Path, release: Release) -> None:
    """Put the zip and its release record in the bucket (the zip only if not there already)."""
    bucket, name, version, size = release.bucket, release.name, release.version, release.size
    aws.call("s3", "head_bucket", Bucket=bucket, fix=f"create the bucket first (aws s3 mb s3://{bucket}) or pass the right --bucket")
    extra = {"ContentType": "application/zip", "Metadata": {"model-name": name, "model-version": version, "sha256": release.sha256}}
    present = aws.exists("s3", "head_object", Bucket=bucket, Key=release.key)
    if present is None or present.get("ContentLength") != size:
        if aws.options.dry_run:
            aws.record("s3", "PutObject", {"Bucket": bucket, "Key": release.key, "Body": f"<{artifact.name}: {size} bytes>", **extra})
        else:
            _upload_with_progress(aws, artifact, bucket, release.key, extra)
    record = json.dumps(dataclasses.asdict(release), indent=2, default=lambda signature: signature.model_dump())
    aws.call("s3", "put_object", Bucket=bucket, Key=record_key(name, version), Body=record.encode(), ContentType="application/json")


def _upload_with_progress(aws: Aws, artifact: Path, bucket: str, key: str, extra: dict) -> None:
    from tqdm import tqdm

    size = artifact.stat().st_size
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"s3://{bucket}/{key}", file=sys.stderr, leave=True) as bar:
        with aws.translating("s3", "PutObject", f"create the bucket first (aws s3 mb s3://{bucket})"):
            aws.client("s3").upload_file(str(artifact), bucket, key, ExtraArgs=extra, Callback=bar.update)


def find_release(aws: Aws, bucket: str, version: str, name: str | None) -> Release:
    """An already-uploaded version's release record; the model name is found in the bucket when not given."""
    if name is None:
        prefixes = aws.pages("s3", "list_objects_v2", "CommonPrefixes", Bucket=bucket, Prefix="models/", Delimiter="/")
        names = [entry["Prefix"].split("/")[1] for entry in prefixes]
        names = [candidate for candidate in names if aws.exists("s3", "head_object", Bucket=bucket, Key=record_key(candidate, version))]
        if not names:
            raise ModelError(f"version {version} was never published to s3://{bucket}; check --to and --bucket, or publish it first (`edge-fleet model publish shipped ...` releases the model devices start with)")
        if len(names) > 1:
            raise ModelError(f"version {version} was published in s3://{bucket} for models {', '.join(names)}; pass --name to say which")
        name = names[0]
    body = aws.call("s3", "get_object", Bucket=bucket, Key=record_key(name, version), fix=f"version {version} of {name} was never published to s3://{bucket}; publish it with `edge-fleet model publish`")["Body"].read()
    record = json.loads(body)
    return Release(**{**record, "signature": Signature.model_validate(record["signature"])})
