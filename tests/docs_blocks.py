"""The command blocks of the project's Markdown guides: found, classified, and run the way a reader pastes them.

A fenced block labelled `sh` (or `bash`, `shell`) is a command block, and it is run, unless the line just
before its opening fence is one of

    <!-- needs-aws -->            or <!-- needs-aws: why -->   it needs a real AWS account, device or camera
    <!-- not-run: why -->                                     it would take too long here, or change this machine

A fence with no label whose first line looks like a command is a mistake (it would escape the check), and so
is a marker that is not just before a fence. Each guide's runnable blocks run in order in one bash, as pasted
into one terminal (`cd`, `export` and files carry over from block to block), in a scratch copy of the checkout
whose `.venv` is the project's, with HOME inside the scratch and AWS pointed at a stand-in (moto).

    python tests/docs_blocks.py      # every guide's blocks: how many run, need AWS, are not run
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GUIDES = ["README.md", "deploy/RUNBOOK.md", "deploy/iot/README.md", "deploy/greengrass/README.md", "deploy/systemd/README.md", "models/keys/README.md"]
SHELLS = {"sh", "bash", "shell"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<label>[^\s`]*)")
MARKER = re.compile(r"^<!--\s*(?P<kind>needs-aws|not-run)\s*(?::\s*(?P<why>.*?))?\s*-->\s*$")
LOOKS_LIKE_A_COMMAND = re.compile(r"^(\$ |\.venv/|\./|edge-agent |edge-fleet |make |python3? |pip |aws |gdk |cd |sudo |export |git )")
RUN, NEEDS_AWS, NOT_RUN = "run", "needs-aws", "not-run"


@dataclass(frozen=True)
class Block:
    guide: str  # path from the top of the checkout
    line: int  # of the opening fence, 1-based
    label: str
    text: str
    status: str  # RUN, NEEDS_AWS or NOT_RUN
    why: str = ""

    @property
    def where(self) -> str:
        return f"{self.guide}:{self.line}"


class DocsError(Exception):
    """A guide whose blocks cannot be classified (a stray marker, an unlabelled command block)."""


def blocks(guide: str, root: Path = REPO) -> list[Block]:
    """Every fenced block of `guide` with what is to be done with it."""
    lines = (root / guide).read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        marker = MARKER.match(lines[number].strip())
        if marker and not (number + 1 < len(lines) and FENCE.match(lines[number + 1])):
            raise DocsError(f"{guide}:{number + 1}: {lines[number].strip()} is not on the line just before a fence; move it there")
        if not opening:
            number += 1
            continue
        fence = opening["fence"]
        end = next((i for i in range(number + 1, len(lines)) if lines[i].strip().startswith(fence[0] * len(fence)) and not lines[i].strip().strip(fence[0])), None)
        if end is None:
            raise DocsError(f"{guide}:{number + 1}: a fence that never closes")
        text = "\n".join(line[len(opening["indent"]):] for line in lines[number + 1:end]) + "\n"
        label = opening["label"].lower()
        before = MARKER.match(lines[number - 1].strip()) if number else None
        if label in SHELLS:
            status, why = (before["kind"], before["why"] or "") if before else (RUN, "")
            found.append(Block(guide, number + 1, label, text, status, why))
        elif before:
            raise DocsError(f"{guide}:{number + 1}: {lines[number - 1].strip()} marks a block that is not labelled sh; label it or drop the marker")
        elif not label and LOOKS_LIKE_A_COMMAND.match(text.lstrip()):
            raise DocsError(f"{guide}:{number + 1}: an unlabelled block of commands; label it sh (and mark it if it cannot run here)")
        number = end + 1
    return found


def scratch_checkout(dest: Path) -> Path:
    """A copy of the checkout's files (tracked, and new ones not ignored) with the project's venv in it.

    `.venv` holds links to the venv running this (the project's) and fresh `make` stamps, so `make demo` or
    `make component` in the copy never reinstall anything; `.git` points at the checkout's repository, for
    `git archive`.
    """
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source, target = REPO / name, dest / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet in the index
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    venv = dest / ".venv"
    venv.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if not entry.name.startswith(".installed"):
            (venv / entry.name).symlink_to(entry)
    for stamp in (".installed", ".installed-test"):
        (venv / stamp).touch()
    git_dir = subprocess.run(["git", "rev-parse", "--absolute-git-dir"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    (dest / ".git").write_text(f"gitdir: {git_dir}\n")
    return dest


def environment(scratch: Path, aws_endpoint: str) -> dict[str, str]:
    """A reader's shell: the project's venv first on PATH, HOME in the scratch, AWS at the stand-in."""
    home = scratch / "home"
    home.mkdir(exist_ok=True)
    keep = {name: value for name, value in os.environ.items() if not name.startswith(("EDGE_AGENT_", "AWS_", "XDG_", "VIRTUAL_ENV"))}
    return {
        **keep,
        "HOME": str(home),
        "PATH": f"{scratch / '.venv' / 'bin'}{os.pathsep}{keep.get('PATH', '')}",
        "AWS_ENDPOINT_URL": aws_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / ".aws" / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / ".aws" / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def buckets(runnable: list[Block]) -> set[str]:
    """The S3 buckets the blocks name with --bucket: a needs-aws block (`aws s3 mb`) would have made them."""
    return {name for block in runnable for name in re.findall(r"--bucket[ =]([a-z0-9][a-z0-9.-]{2,62})\b", block.text)}


BEGIN = "::docs-block::"


def script(runnable: list[Block]) -> str:
    """One bash script: each block after a line naming it, stopping at the first command that fails."""
    parts = ["set -e -o pipefail"]
    for block in runnable:
        parts.append(f"printf '\\n{BEGIN}%s\\n' '{block.where}'")
        parts.append(block.text)
    return "\n".join(parts) + "\n"


@dataclass
class Outcome:
    returncode: int
    output: str
    last_block: str | None  # where the last block that started is

    def since_last_block(self) -> str:
        return self.output.rsplit(BEGIN, 1)[-1] if BEGIN in self.output else self.output


def run(runnable: list[Block], cwd: Path, env: dict[str, str], timeout: float) -> Outcome:
    """Run the blocks in one bash; on a timeout the whole process group is killed and the outcome says so."""
    process = subprocess.Popen(["bash", "-c", script(runnable)], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        returncode = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        output += f"\n(killed after {timeout:.0f} s)"
        returncode = -signal.SIGKILL
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    started = re.findall(rf"^{BEGIN}(.*)$", output, re.MULTILINE)
    return Outcome(returncode, output, started[-1] if started else None)


def main() -> int:
    total = {RUN: 0, NEEDS_AWS: 0, NOT_RUN: 0}
    for guide in GUIDES:
        found = blocks(guide)
        counts = {status: sum(block.status == status for block in found) for status in total}
        for status, count in counts.items():
            total[status] += count
        print(f"{guide}: {counts[RUN]} run, {counts[NEEDS_AWS]} need AWS, {counts[NOT_RUN]} not run")
        for block in found:
            if block.status != RUN:
                print(f"  {block.where} {block.status}{': ' + block.why if block.why else ''}")
    print(f"all guides: {total[RUN]} run, {total[NEEDS_AWS]} need AWS, {total[NOT_RUN]} not run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
