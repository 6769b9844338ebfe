"""`edge-fleet`: the operator's tool. Argument parsing only; the work is in the modules it calls.

Two explicit registries of functions that add subcommands: TOP_LEVEL (`edge-fleet NAME ...`) and MODEL
(`edge-fleet model NAME ...`). A new command is one such function in its own module and one line here.
This is the one place an AgentError becomes a line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from agent.bundles.signing import DEFAULT_PRIVATE_KEY
from agent.command_line import Parser
from agent.errors import AgentError
from agent.fleet.cloud_commands import (
    add_cloud_commands,
    add_fleet_commands,
    add_job_commands,
    add_provision_command,
    add_release_commands,
)
from agent.fleet.data import add_data_commands


def cmd_model_keygen(args: argparse.Namespace) -> int:
    from agent.bundles.signing import generate_key

    public = args.public or args.key.with_suffix(".pub")
    key_id = generate_key(args.key, public)
    print(json.dumps({"key_id": key_id, "private_key": str(args.key), "public_key": str(public)}))
    return 0


def cmd_model_pack(args: argparse.Namespace) -> int:
    from agent.fleet.packing import pack, write_zip

    manifest = pack(args.dir)
    if args.zip:
        write_zip(args.dir, args.zip, option="--zip")
    print(json.dumps({"name": manifest.name, "version": manifest.version, "files": len(manifest.files), "zip": str(args.zip) if args.zip else None}))
    return 0


def cmd_model_sign(args: argparse.Namespace) -> int:
    from agent.fleet.packing import sign_bundle

    print(json.dumps({"bundle": str(args.bundle), "signed_by": sign_bundle(args.bundle, args.key)}))
    return 0


Subcommands = argparse._SubParsersAction


def add_bundle_commands(sub: Subcommands) -> None:
    """`model keygen|pack|sign`: make bundles a device will accept."""
    keygen = sub.add_parser("keygen", help="create an Ed25519 signing key pair (each fleet makes its own)")
    keygen.add_argument("--key", type=Path, default=DEFAULT_PRIVATE_KEY, help=f"private key to write, mode 0600 (default {DEFAULT_PRIVATE_KEY})")
    keygen.add_argument("--public", type=Path, help="public key to write (default: the private key's path with .pub); give it to devices")
    keygen.set_defaults(handler=cmd_model_keygen)

    pack = sub.add_parser("pack", help="write the sha256 of every file into DIR/manifest.json (and optionally zip it)")
    pack.add_argument("dir", type=Path, help="bundle directory: manifest.json, model.tflite, labels.txt, golden.npz")
    pack.add_argument("--zip", type=Path, help="also write the bundle as this .zip")
    pack.set_defaults(handler=cmd_model_pack)

    sign = sub.add_parser("sign", help="sign a bundle directory or .zip (writes manifest.sig)")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, default=DEFAULT_PRIVATE_KEY, help=f"Ed25519 private key (default {DEFAULT_PRIVATE_KEY})")
    sign.set_defaults(handler=cmd_model_sign)


def add_model_group(commands: Subcommands) -> None:
    model = commands.add_parser("model", help="make, sign and release model bundles")
    sub = model.add_subparsers(dest="model_command", required=True, parser_class=Parser)
    for add_commands in MODEL:
        add_commands(sub)


# `edge-fleet model ...`: functions adding subcommands to the model group.
MODEL: list[Callable[[Subcommands], None]] = [add_bundle_commands, add_release_commands]
# `edge-fleet ...`: functions adding top-level commands or groups.
TOP_LEVEL: list[Callable[[Subcommands], None]] = [add_cloud_commands, add_model_group, add_provision_command, add_fleet_commands, add_job_commands, add_data_commands]


def build_parser() -> Parser:
    parser = Parser(prog="edge-fleet", description="Operator tool: build, sign and roll out model bundles to a fleet.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add_commands in TOP_LEVEL:
        add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except AgentError as error:
        print(f"edge-fleet: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
