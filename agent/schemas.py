"""The published JSON Schemas of every message, generated from the pydantic models (never hand-edited)."""

from __future__ import annotations

import json
from pathlib import Path

from agent.errors import writing
from agent.messages import PUBLISHED

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def schema_documents() -> dict[str, dict]:
    """File name -> JSON Schema document, for every published message kind."""
    documents = {}
    for name, model in PUBLISHED.items():
        schema = model.model_json_schema(mode="serialization")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://github.com/edge-agent/schemas/{name}.schema.json"
        documents[f"{name}.schema.json"] = schema
    return documents


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(out: Path | None = None) -> list[Path]:
    """Write every schema into `out` (created if missing; default: the package's schemas folder)."""
    folder = out or SCHEMA_DIR
    written = []
    with writing("--out", folder):
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, schema in schema_documents().items():
            path = folder / file_name
            path.write_text(render(schema), encoding="utf-8")
            written.append(path)
    return written
