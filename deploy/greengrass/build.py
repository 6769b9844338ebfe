"""Build the two Greengrass components' artifacts and recipes, byte for byte the same on every run.

    python deploy/greengrass/build.py            # both components, each into its GDK folder (below)
    python deploy/greengrass/build.py agent      # deploy/greengrass/greengrass-build/ (what `gdk component build` runs)
    python deploy/greengrass/build.py model      # deploy/greengrass/model/greengrass-build/
    python deploy/greengrass/build.py recipe     # rewrite recipe.json's DefaultConfiguration from agent.settings

Run it with the project's venv (`make component` does): the model's zip is made by the agent's own packing
code. Output follows GDK's layout, greengrass-build/artifacts/<component>/<version>/ and
greengrass-build/recipes/, in each component's folder (next to its gdk-config.json, where `gdk component
publish` looks); every file written is printed with its absolute path. Reproducible: everything comes from
the last commit (git archive HEAD, so commit first), the wheel is built with SOURCE_DATE_EPOCH = that
commit's time, and the model bundle is zipped in sorted order with fixed timestamps and permissions.
`--trusted-key` is the public key the agent component trusts for model updates (model-signing.pub): your
fleet's key; the default is the development key.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the agent package gives settings and zips
AGENT_RECIPE = HERE / "recipe.json"
MODEL_RECIPE = HERE / "model" / "recipe.json"
MODEL_BUNDLE = Path("models/mnist/bundle")  # paths inside the committed tree
BUNDLE_ZIP = "mnist-bundle.zip"  # the nucleus unpacks it to {decompressedPath}/mnist-bundle/
TRUSTED_KEY = REPO / "models" / "keys" / "dev-signing-2026-12b.pub"  # the development key whose private half exists
GDK_BUILD = "greengrass-build"  # GDK's output folder, next to each component's gdk-config.json
# Settings that name something on the build machine, replaced by what a device has. The rest of the
# DefaultConfiguration is the settings' own defaults; a null leaves a setting to the Run script's flags.
DEVICE_DEFAULTS = {"thing_name": None, "transport": "greengrass", "source": {"spec": "camera:0"}}


def default_configuration() -> dict:
    """Every setting, with agent.settings's names and declared defaults; paths of this machine become null."""
    from agent.settings import PACKAGE, Settings, deep_merge

    def portable(value):
        if isinstance(value, dict):
            return {key: portable(item) for key, item in value.items()}
        if isinstance(value, list):
            kept = [portable(item) for item in value]
            return None if None in kept else kept
        return None if isinstance(value, str) and value.startswith(str(PACKAGE)) else value

    # Declared defaults, unvalidated: validation would resolve state paths against this machine's state_dir.
    return deep_merge(portable(Settings.model_construct().model_dump(mode="json")), DEVICE_DEFAULTS)


def write_recipe_configuration() -> None:
    recipe = json.loads(AGENT_RECIPE.read_text())
    configuration = recipe["ComponentConfiguration"]["DefaultConfiguration"]
    recipe["ComponentConfiguration"]["DefaultConfiguration"] = {**default_configuration(), "accessControl": configuration["accessControl"]}
    AGENT_RECIPE.write_text(json.dumps(recipe, indent=2) + "\n")


def source_date_epoch() -> str:
    result = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() or "315532800"


def export_head(dest: Path) -> Path:
    """The committed tree (HEAD), never whatever the working tree holds right now."""
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def build_wheel(tree: Path, out: Path) -> Path:
    with tempfile.TemporaryDirectory() as wheels:
        env = {**os.environ, "SOURCE_DATE_EPOCH": source_date_epoch(), "PYTHONHASHSEED": "0"}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, str(tree)], check=True, env=env)
        (wheel,) = Path(wheels).glob("edge_agent-*.whl")
        return Path(shutil.copy2(wheel, out / wheel.name))


def stage(recipe_path: Path, build: Path) -> tuple[dict, Path]:
    recipe = json.loads(recipe_path.read_text())
    artifacts = build / "artifacts" / recipe["ComponentName"] / recipe["ComponentVersion"]
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    (build / "recipes").mkdir(parents=True, exist_ok=True)
    shutil.copy2(recipe_path, build / "recipes" / f"{recipe['ComponentName']}-{recipe['ComponentVersion']}.json")
    return recipe, artifacts


def build_agent(tree: Path, build: Path, trusted_key: Path) -> None:
    recipe, artifacts = stage(tree / AGENT_RECIPE.relative_to(REPO), build)
    wheel = build_wheel(tree, artifacts)
    expected = {Path(a["Uri"]).name for m in recipe["Manifests"] for a in m["Artifacts"]}
    if wheel.name not in expected:
        raise SystemExit(f"built {wheel.name} but recipe.json names {sorted(expected)}; update its Artifacts and Run script")
    shutil.copy2(tree / "constraints.txt", artifacts / "constraints.txt")
    shutil.copyfile(trusted_key, artifacts / "model-signing.pub")


def build_model(tree: Path, build: Path) -> None:
    try:
        from agent.fleet.packing import write_zip
    except ImportError as missing:
        raise SystemExit(f"build.py model needs the project's venv ({missing.name} is missing): run `make component`, or run build.py and gdk with .venv/bin/python") from None

    _, artifacts = stage(tree / MODEL_RECIPE.relative_to(REPO), build)
    write_zip(tree / MODEL_BUNDLE, artifacts / BUNDLE_ZIP)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", choices=["all", "agent", "model", "recipe"], default="all")
    parser.add_argument("--out", type=Path, help=f"output folder (default: {GDK_BUILD}/ in each component's folder)")
    parser.add_argument("--trusted-key", type=Path, default=TRUSTED_KEY, help="public key the agent trusts for model updates, shipped as model-signing.pub (default: the development key)")
    args = parser.parse_args()
    if args.what == "recipe":
        write_recipe_configuration()
        return
    if not args.trusted_key.is_file():
        raise SystemExit(f"--trusted-key {args.trusted_key}: no such file; pass your fleet's public key (edge-fleet model keygen writes it)")
    chosen = ["agent", "model"] if args.what == "all" else [args.what]
    outputs = {name: (args.out or recipe.parent / GDK_BUILD).resolve() for name, recipe in (("agent", AGENT_RECIPE), ("model", MODEL_RECIPE)) if name in chosen}
    with tempfile.TemporaryDirectory() as scratch:
        tree = export_head(Path(scratch))
        if "agent" in outputs:
            build_agent(tree, outputs["agent"], args.trusted_key)
        if "model" in outputs:
            build_model(tree, outputs["model"])
    for out in sorted(set(outputs.values())):
        for path in sorted(out.rglob("*")):
            if path.is_file():
                print(path)


if __name__ == "__main__":
    main()
