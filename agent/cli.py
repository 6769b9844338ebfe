"""`edge-agent`: argument parsing only. Every command calls into the modules that do the work.

This is the one place an AgentError becomes a line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from agent import __version__
from agent.command_line import Parser
from agent.errors import AgentError, ConfigError

# Everyday flags of `run`, `infer` and `bench`: flag -> (settings key path, argparse options, help).
# Values go to the settings tree unconverted, so pydantic validates flags, files and env vars alike.
SETTING_FLAGS: dict[str, tuple[tuple[str, ...], dict[str, Any], str]] = {
    "--source": (("source", "spec"), {}, "camera:N, a video file, an image folder, or an rtsp:// / http(s):// URL"),
    "--model": (("model", "bundle"), {}, "model bundle directory or .zip"),
    "--transport": (("transport",), {"choices": ["console", "mqtt", "greengrass"]}, "where results go"),
    "--max-frames": (("max_frames",), {}, "stop after N frames"),
    "--thing-name": (("thing_name",), {}, "IoT thing name (also the MQTT client id)"),
    "--endpoint": (("mqtt", "endpoint"), {}, "IoT Core data endpoint"),
    "--port": (("mqtt", "port"), {}, "MQTT port (default 8883)"),
    "--cert": (("mqtt", "cert"), {}, "device certificate (PEM)"),
    "--key": (("mqtt", "key"), {}, "device private key (PEM)"),
    "--ca": (("mqtt", "ca"), {}, "CA certificate for the endpoint (default: Amazon Root CA 1)"),
    "--backend": (("model", "backend"), {}, "what runs the model: auto or a backend's name (edge-agent bench --backends all lists them)"),
    "--threshold": (("model", "score_threshold"), {}, "publish predictions scoring at least this"),
    "--finder": (("tasks", "mnist_digits", "finder"), {"choices": ["auto", "learned", "opencv"]}, "digit finder: the bundle's learned one, OpenCV's, or auto (learned when the bundle has one)"),
    "--pace-fps": (("source", "pace_fps"), {}, "at most this many frames a second (a file is read like a camera; a live source drops the rest)"),
    "--trusted-key": (("model", "trusted_keys"), {"action": "append"}, "Ed25519 public key allowed to sign models (repeatable)"),
    "--liveview-port": (("liveview", "port"), {}, "port of the live view, /metrics and /healthz (default 8080)"),
    "--state-dir": (("state_dir",), {}, "folder for the outbox and model store (default ~/.local/state/edge-agent)"),
    "--log-level": (("log", "level"), {"type": str.upper, "choices": ["DEBUG", "INFO", "WARNING", "ERROR"]}, "least severe log level on stderr (default INFO)"),
}
SWITCH_FLAGS: dict[str, tuple[tuple[str, ...], Any, str]] = {
    "--loop": (("source", "loop"), True, "restart a video file or folder at its end"),
    "--allow-unsigned": (("model", "require_signature"), False, "accept models without a trusted signature (development only)"),
    "--liveview": (("liveview", "enabled"), True, "serve the annotated live view, /metrics and /healthz on 127.0.0.1"),
}


def _dest(flag: str) -> str:
    return "setting_" + flag.lstrip("-").replace("-", "_")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a command that runs from the settings tree; main() loads it into `args.settings`."""
    parser.set_defaults(uses_settings=True)
    from agent.inference.backends import backend_names

    parser.add_argument("--config", type=Path, help="settings file (.yaml, .json or .toml)")
    for flag, (_, options, help_text) in SETTING_FLAGS.items():
        if flag == "--backend":  # the registry's names: built-ins and installed plugins
            options = {"choices": ["auto", *backend_names()]}
        parser.add_argument(flag, dest=_dest(flag), help=help_text, **options)
    for flag, (_, value, help_text) in SWITCH_FLAGS.items():
        parser.add_argument(flag, dest=_dest(flag), action="store_const", const=value, help=help_text)


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags the user gave, as a nested settings dict."""
    overrides: dict[str, Any] = {}
    for flag, (path, *_rest) in {**SETTING_FLAGS, **SWITCH_FLAGS}.items():
        value = getattr(args, _dest(flag))
        if value is None:
            continue
        node = overrides
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return overrides


def settings_from(args: argparse.Namespace):
    from agent.settings import load_settings

    return load_settings(args.config, flag_overrides(args))


def cmd_run(args: argparse.Namespace) -> int:
    from agent.app import run_agent

    summary = run_agent(args.settings)
    print(json.dumps(dataclasses.asdict(summary)), file=sys.stderr)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from agent.infer import infer_images

    for result in infer_images(args.settings, args.images):
        print(result.model_dump_json(exclude_none=True))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.pick and args.config is None:  # said before minutes of measuring, not after
        raise ConfigError("--pick writes model.backend into the settings file: pass --config FILE (.yaml or .json)")
    settings = args.settings
    if args.backends is None:
        from agent.bench import run_bench

        print(json.dumps(run_bench(settings, seconds=args.seconds), indent=2))
        return 0
    from agent import bench_backends
    from agent.inference.backends import backend_names

    names = [*backend_names()] if args.backends == "all" else [name.strip() for name in args.backends.split(",") if name.strip()]
    report = bench_backends.compare_backends(settings, names, args.threads, dict(args.python or []))
    print(bench_backends.format_table(report), end="")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        bench_backends.plot(report, args.plot)
    if args.pick:
        chosen = bench_backends.pick_into(report, args.config)
        print(f"model.backend = {json.dumps(chosen)} written to {args.config}", file=sys.stderr)
    return 0


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of thread counts, e.g. 1,2") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: thread counts start at 1")
    return counts


def _python_for(text: str) -> tuple[str, str]:
    name, _, python = text.partition("=")
    if not name or not python:
        raise argparse.ArgumentTypeError(f"{text!r} is not BACKEND=PYTHON, e.g. tflite-runtime=.venv-tflite/bin/python")
    return name, python


def cmd_settings(args: argparse.Namespace) -> int:
    from agent.settings import settings_table

    print(settings_table(), end="")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from agent.schemas import write_schemas

    for path in write_schemas(args.out):
        print(path)
    return 0


def model_settings(args: argparse.Namespace):
    """`model verify|eval` flags as the model settings every loader takes (default trusted keys: the development ones)."""
    from agent.settings import ModelSettings

    options = {"bundle": args.bundle, "require_signature": not args.allow_unsigned, "max_bundle_mb": args.max_mb}
    if args.trusted_key:
        options["trusted_keys"] = args.trusted_key
    return ModelSettings(**options)


def cmd_model_verify(args: argparse.Namespace) -> int:
    from agent.bundles.bundle import open_bundle

    model = model_settings(args)
    bundle = open_bundle(model.bundle, trusted_keys=model.trusted_keys, require_signature=model.require_signature, max_bytes=model.max_bundle_bytes)
    manifest = bundle.manifest
    print(json.dumps({"ok": True, "name": manifest.name, "version": manifest.version, "signed_by": bundle.signer}))
    return 0


def cmd_model_eval(args: argparse.Namespace) -> int:
    from agent.inference.evaluate import evaluate_bundle
    from agent.settings import TaskSettings

    print(json.dumps(evaluate_bundle(args.bundle, model_settings(args), TaskSettings()), indent=2))
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from agent.cloud.provisioning import Claim, provision

    if not args.endpoint:
        raise ConfigError("--endpoint is not set; pass the IoT data endpoint (`edge-fleet cloud deploy` prints it) or set EDGE_AGENT_MQTT__ENDPOINT")
    claim = Claim(cert=args.claim_cert, key=args.claim_key, endpoint=args.endpoint, template=args.template, port=args.port, timeout_s=args.timeout, **({"ca": args.ca} if args.ca else {}))
    print(json.dumps(provision(claim, args.out, args.serial, args.trusted_key or []), indent=2))
    return 0


def add_provision_command(commands: argparse._SubParsersAction) -> None:
    provision = commands.add_parser("provision", help="first boot: trade the claim certificate for this device's own thing, certificate and settings")
    provision.add_argument("--claim-cert", type=Path, required=True, help="claim certificate (PEM) shipped with the device")
    provision.add_argument("--claim-key", type=Path, required=True, help="its private key")
    provision.add_argument("--template", required=True, help="fleet provisioning template name (the stack's ProvisioningTemplateName)")
    provision.add_argument("--endpoint", default=os.environ.get("EDGE_AGENT_MQTT__ENDPOINT"), help="IoT Core data endpoint (default: EDGE_AGENT_MQTT__ENDPOINT)")
    provision.add_argument("--port", type=int, default=8883, help="MQTT port (default 8883)")
    provision.add_argument("--ca", type=Path, help="CA certificate of the endpoint (default: Amazon Root CA 1)")
    provision.add_argument("--serial", help="this device's serial number, which becomes its thing name (default: the host name)")
    provision.add_argument("--trusted-key", type=Path, action="append", help="Ed25519 public key allowed to sign models, for the settings (repeatable)")
    provision.add_argument("--out", type=Path, required=True, help="folder for agent.yaml, the certificate and its private key (made 0700)")
    provision.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the connection and for each answer (default 30)")
    provision.set_defaults(handler=cmd_provision)


def build_parser() -> Parser:
    from agent.settings import ModelSettings

    parser = Parser(prog="edge-agent", description="Edge vision agent: camera frames -> int8 TFLite -> AWS IoT Core.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = commands.add_parser("run", help="serve: read frames, infer, publish results")
    add_setting_flags(run)
    run.set_defaults(handler=cmd_run)

    infer = commands.add_parser("infer", help="run the model on image files and print one result per image")
    infer.add_argument("images", nargs="+", type=Path)
    add_setting_flags(infer)
    infer.set_defaults(handler=cmd_infer)

    bench = commands.add_parser("bench", help="measure invoke latency, per-frame cost, CPU, memory, start-up (JSON); with --backends, compare backends (table)")
    bench.add_argument("--seconds", type=float, default=10.0, help="how long the 30 fps run lasts")
    bench.add_argument("--backends", help="compare backends instead: all (every installed one) or NAME,NAME; prints a Markdown table")
    bench.add_argument("--threads", type=_thread_counts, default=[1, 2], help="with --backends: thread counts to try where a backend has threads (default 1,2)")
    bench.add_argument("--python", type=_python_for, action="append", metavar="BACKEND=PYTHON", help="with --backends: measure BACKEND with another environment's Python (repeatable)")
    bench.add_argument("--json", type=Path, help="with --backends: also write the figures as JSON to this file")
    bench.add_argument("--plot", type=Path, help="with --backends: also draw them as a bar chart PNG (needs the plot extra)")
    bench.add_argument("--pick", action="store_true", help="with --backends: write the fastest backend that agrees with the reference into the --config settings file")
    add_setting_flags(bench)
    bench.set_defaults(handler=cmd_bench)

    add_provision_command(commands)

    settings = commands.add_parser("settings", help="print every setting: key, environment variable, default, meaning (Markdown)")
    settings.set_defaults(handler=cmd_settings)

    schema = commands.add_parser("schema", help="write the JSON Schemas of the published messages")
    schema.add_argument("--out", type=Path, default=None, help="folder (default: the package's schemas folder)")
    schema.set_defaults(handler=cmd_schema)

    model = commands.add_parser("model", help="check a model bundle").add_subparsers(dest="model_command", required=True, parser_class=Parser)
    for name, handler, help_text in (
        ("verify", cmd_model_verify, "check hashes and signature; prints the bundle's name and version"),
        ("eval", cmd_model_eval, "accuracy on MNIST test and golden set, invoke latency"),
    ):
        sub = model.add_parser(name, help=help_text)
        sub.add_argument("bundle", type=Path)
        sub.add_argument("--trusted-key", type=Path, action="append", help="Ed25519 public key (repeatable; default: the development keys)")
        sub.add_argument("--allow-unsigned", action="store_true", help="accept a bundle without a signature")
        sub.add_argument("--max-mb", type=float, default=ModelSettings().max_bundle_mb, help="largest bundle accepted, unpacked (setting model.max_bundle_mb)")
        sub.set_defaults(handler=handler)
    return parser


def configure(args: argparse.Namespace) -> None:
    """Load the settings of a command that has them, and configure logging, once, from their `log` branch."""
    from agent.observe.logs import configure_logging
    from agent.settings import LogSettings

    args.settings = settings_from(args) if getattr(args, "uses_settings", False) else None
    configure_logging(args.settings.log if args.settings else LogSettings())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        configure(args)
        return handler(args)
    except AgentError as error:
        print(f"edge-agent: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read stdout has gone (`edge-agent run | head`): stop as a pipe tool does, quietly, with
        # SIGPIPE's exit status; stdout goes to /dev/null so the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
