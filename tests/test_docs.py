"""The guides' command blocks work as written: each guide's runnable blocks run in order in one shell, in a
scratch copy of the checkout with the project's venv, AWS requests going to moto (tests/docs_blocks.py says
how blocks are found and marked). A block that stops working fails here, naming its file and line."""

from __future__ import annotations

import subprocess
import urllib.request

import boto3
import pytest
from aws_stand_in import REGION, moto_server  # noqa: F401 (fixture)
from docs_blocks import GUIDES, RUN, DocsError, blocks, buckets, environment, run, scratch_checkout

GUIDE_TIMEOUT_S = 600  # make demo, make component and a wheel build are the slow blocks: about a minute in all


def test_every_guide_marks_what_cannot_run_here():
    for guide in GUIDES:
        blocks(guide)  # a stray marker or an unlabelled block of commands raises DocsError naming its line


def test_every_command_block_is_valid_shell():
    for guide in GUIDES:
        for block in blocks(guide):
            checked = subprocess.run(["bash", "-n", "-c", block.text], capture_output=True, text=True, timeout=30)
            assert checked.returncode == 0, f"{block.where}: {checked.stderr.strip()}"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<!-- needs-aws -->\n\n```sh\naws s3 ls\n```\n", "not on the line just before a fence"),
        ("```\nmake demo\n```\n", "unlabelled block of commands"),
        ("<!-- not-run: slow -->\n```json\n{}\n```\n", "not labelled sh"),
        ("```sh\nmake demo\n", "never closes"),
    ],
)
def test_a_block_that_could_escape_the_check_is_refused(tmp_path, text, problem):
    (tmp_path / "GUIDE.md").write_text(text)
    with pytest.raises(DocsError, match=problem):
        blocks("GUIDE.md", root=tmp_path)


def test_markers_decide_what_runs(tmp_path):
    (tmp_path / "GUIDE.md").write_text(
        "```sh\nmake demo\n```\n<!-- needs-aws -->\n```sh\naws s3 ls\n```\n<!-- not-run: slow -->\n```bash\nmake test\n```\n```json\n{}\n```\n"
    )
    found = blocks("GUIDE.md", root=tmp_path)
    assert [(block.line, block.status, block.why) for block in found] == [(1, "run", ""), (5, "needs-aws", ""), (9, "not-run", "slow")]


@pytest.mark.timeout(GUIDE_TIMEOUT_S + 60)
@pytest.mark.parametrize("guide", GUIDES)
def test_guide_commands_run_as_written(guide, tmp_path, moto_server):  # noqa: F811
    runnable = [block for block in blocks(guide) if block.status == RUN]
    if not runnable:
        pytest.skip(f"every block of {guide} needs AWS or a device")
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST"), timeout=10).read()
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_server, aws_access_key_id="testing", aws_secret_access_key="testing")
    for bucket in buckets(runnable):
        s3.create_bucket(Bucket=bucket)
    scratch = scratch_checkout(tmp_path / "checkout")
    outcome = run(runnable, scratch, environment(scratch, moto_server), timeout=GUIDE_TIMEOUT_S)
    print(f"{guide}: {len(runnable)} blocks run")
    assert outcome.returncode == 0, f"{outcome.last_block} failed (exit {outcome.returncode}):\n{outcome.since_last_block()[-4000:]}"
