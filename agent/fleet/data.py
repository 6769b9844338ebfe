"""`edge-fleet data pull`: the frames devices captured for retraining, as a dataset folder to review and train on.

Reads `s3://BUCKET/captures/{thing}/{date}/{model}/` for every thing of a group (or one thing) from a date
on, and writes:

    OUT/images/<capture id>[-n].jpg   the JPEGs as captured (a whole frame, or crops of its boxes)
    OUT/records/<capture id>.json     each capture's record (agent.messages.CaptureRecord)
    OUT/labels.csv                    one row per prediction: where it is, what the serving model proposed,
                                      what a shadow candidate said there, and a `label` column to review
                                      (it starts as the proposal; models/mnist/train.py --dataset reads it)

A pull is resumable: captures already in OUT are not downloaded again, and labels already reviewed in
labels.csv are kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import date
from pathlib import Path

from pydantic import ValidationError

from agent.errors import ConfigError
from agent.fleet.aws import Aws
from agent.fleet.cloud_commands import (
    Subcommands,
    add_aws_options,
    add_target_options,
    command_group,
    make_aws,
)
from agent.messages import CaptureRecord, Prediction

LABEL_COLUMNS = ["capture_id", "image", "x", "y", "w", "h", "proposed", "score", "candidate", "strategy", "label"]
MATCH_IOU = 0.5


def capture_records(aws: Aws, bucket: str, things: list[str], since: date, prefix: str = "captures") -> list[str]:
    """The S3 keys of every capture record of `things` captured on or after `since` (keys sort by date)."""
    keys = []
    for thing in things:
        start = f"{prefix}/{thing}/{since:%Y-%m-%d}"
        objects = aws.pages("s3", "list_objects_v2", "Contents", Bucket=bucket, Prefix=f"{prefix}/{thing}/", StartAfter=start)
        keys += [entry["Key"] for entry in objects if entry["Key"].endswith(".json")]
    return keys


def pull(aws: Aws, bucket: str, things: list[str], since: date, out: Path, prefix: str = "captures", progress=None) -> dict:
    """Download the captures into `out` and (re)write its labels.csv; a summary."""
    from tqdm import tqdm

    keys = capture_records(aws, bucket, things, since, prefix)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "records").mkdir(parents=True, exist_ok=True)
    fetched = skipped = 0
    for key in tqdm(keys, desc=f"s3://{bucket}/{prefix}", unit="capture", file=progress or sys.stderr):
        record_path = out / "records" / Path(key).name
        if record_path.exists():
            skipped += 1
            continue
        body = aws.call("s3", "get_object", Bucket=bucket, Key=key)["Body"].read()
        try:
            record = CaptureRecord.model_validate_json(body)
        except ValidationError:
            continue  # not a capture record: someone else's object under the prefix
        folder = key.rsplit("/", 1)[0]
        for image in record.images:
            data = aws.call("s3", "get_object", Bucket=bucket, Key=f"{folder}/{image.file}")["Body"].read()
            (out / "images" / image.file).write_bytes(data)
        record_path.write_bytes(body)  # last: a record in OUT means its images are there
        fetched += 1
    rows = write_labels(out)
    return {"bucket": bucket, "things": len(things), "captures": fetched + skipped, "downloaded": fetched, "already_here": skipped, "labels": rows, "out": str(out)}


def label_rows(record: CaptureRecord) -> list[dict[str, str]]:
    """One row per serving prediction with a box (or one per capture for a classifier's frame)."""
    rows = []
    for prediction in record.predictions or [None]:
        box = prediction.box if prediction is not None else None
        rows.append({
            "capture_id": record.capture_id,
            "image": next((image.file for image in record.images if box is not None and image.box == box), record.images[0].file),
            "x": str(box.x) if box else "", "y": str(box.y) if box else "", "w": str(box.w) if box else "", "h": str(box.h) if box else "",
            "proposed": prediction.label if prediction else "",
            "score": f"{prediction.score:.4f}" if prediction else "",
            "candidate": _candidate_label(prediction, record.candidate_predictions),
            "strategy": record.strategy,
            "label": prediction.label if prediction else "",
        })
    return rows


def _candidate_label(prediction: Prediction | None, candidate: list[Prediction] | None) -> str:
    """What the shadow candidate said at the same place (IoU 0.5), if it was there."""
    if prediction is None or prediction.box is None or not candidate:
        return ""
    overlaps = [(prediction.box.iou(other.box), other.label) for other in candidate if other.box is not None]
    best = max(overlaps, default=(0.0, ""))
    return best[1] if best[0] >= MATCH_IOU else ""


def write_labels(out: Path) -> int:
    """labels.csv from every record in OUT; a label already reviewed there is kept."""
    path = out / "labels.csv"
    reviewed: dict[tuple[str, str, str, str], str] = {}
    if path.exists():
        with open(path, newline="") as stream:
            for row in csv.DictReader(stream):
                reviewed[(row["capture_id"], row["image"], row["x"], row["y"])] = row["label"]
    rows = []
    for record_path in sorted((out / "records").glob("*.json")):
        record = CaptureRecord.model_validate_json(record_path.read_bytes())
        for row in label_rows(record):
            row["label"] = reviewed.get((row["capture_id"], row["image"], row["x"], row["y"]), row["label"])
            rows.append(row)
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def cmd_data_pull(args: argparse.Namespace) -> int:
    from agent.fleet.status import thing_names

    try:
        since = date.fromisoformat(args.since)
    except ValueError:
        raise ConfigError(f"--since {args.since!r}: not a date; use YYYY-MM-DD") from None
    aws = make_aws(args)
    things = [args.thing] if args.thing else thing_names(aws, args.group)
    aws.call("s3", "head_bucket", Bucket=args.bucket, fix=f"bucket {args.bucket!r} not found; pass the bucket devices upload captures to (capture.bucket)")
    print(json.dumps(pull(aws, args.bucket, things, since, args.out, args.prefix), indent=2))
    return 0


def add_data_commands(commands: Subcommands) -> None:
    pull_parser = command_group(commands, "data", "the frames devices captured for retraining").add_parser("pull", help="download captures into a dataset folder (images, records, labels.csv to review)")
    add_target_options(pull_parser)
    pull_parser.add_argument("--since", required=True, metavar="YYYY-MM-DD", help="captures from this day (UTC) on")
    pull_parser.add_argument("--out", type=Path, required=True, help="dataset folder (created; a second pull adds what is new)")
    pull_parser.add_argument("--bucket", required=True, help="the bucket devices upload captures to (capture.bucket)")
    pull_parser.add_argument("--prefix", default="captures", help="key prefix in the bucket (default captures)")
    add_aws_options(pull_parser, changes=False)
    pull_parser.set_defaults(handler=cmd_data_pull)
