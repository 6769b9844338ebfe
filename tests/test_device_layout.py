"""A standalone device as documented: the agent installed from its wheel (no checkout anywhere near it), started
from any directory, its state in one state directory, run by the systemd unit's own command line.

The wheel is built from this checkout and installed into a fresh venv whose other packages come from the
project's venv (a .pth file: the editable install of the checkout is not among them), so `import agent` there
finds only what the wheel carries.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import yaml
from aws_stand_in import aws, aws_env, moto_server  # noqa: F401 (fixtures)
from broker import Mosquitto, Observer, mosquitto, pki  # noqa: F401 (fixtures)
from conftest import REPO, SAMPLE_VIDEO, agent_env
from iot_service import IotService

from agent.messages import unbatch
from agent.settings import DEV_SIGNING_KEYS, PACKAGE, SHIPPED_BUNDLE, load_settings

UNIT = REPO / "deploy" / "systemd" / "edge-agent.service"
THING = "camera-01"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding the agent as installed from its wheel; returns its bin folder."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", root / "dist", REPO], check=True, timeout=300, cwd=root)
    (wheel,) = (root / "dist").glob("edge_agent-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "project-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # numpy, awscrt, ... (not the editable agent)
    subprocess.run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet", "--no-deps", "--no-index", wheel], check=True, timeout=300)
    where = subprocess.run([venv / "bin" / "python", "-c", "import agent; print(agent.__file__)"], capture_output=True, text=True, check=True, cwd=root).stdout.strip()
    assert Path(where).is_relative_to(site), where
    return venv / "bin"


def test_the_installed_agent_runs_from_any_directory_on_what_its_wheel_ships(installed, tmp_path):
    anywhere = tmp_path / "anywhere"
    anywhere.mkdir()
    done = subprocess.run([installed / "edge-agent", "run", "--max-frames", "20"], capture_output=True, text=True, timeout=120, env=agent_env(), cwd=anywhere)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    inference = [result for result in results if result["kind"] == "inference"]
    assert inference and all(result["model"]["version"] == "1.2.0" for result in inference)
    assert Path(inference[0]["source"]).is_relative_to(installed.parent), "the sample video is the wheel's own"
    assert list(anywhere.iterdir()) == []  # nothing written where it was started


def test_a_provisioned_folder_copied_anywhere_starts_the_installed_agent(installed, aws, tmp_path):  # noqa: F811
    """edge-fleet from the wheel provisions (its policy file is shipped too); the folder goes to another place, as
    to /etc/edge-agent; the agent starts from a third directory, trusting only the fleet key, on its shipped model."""
    key = tmp_path / "keys" / "fleet.key"
    fleet = lambda *args: subprocess.run([installed / "edge-fleet", *map(str, args)], capture_output=True, text=True, timeout=120, env=agent_env(), cwd=tmp_path)  # noqa: E731
    assert fleet("model", "keygen", "--key", key).returncode == 0
    provisioned = fleet("provision", THING, "--out", tmp_path / "out", "--trusted-key", key.with_suffix(".pub"), "--endpoint-url", aws)
    assert provisioned.returncode == 0, provisioned.stderr
    etc = Path(shutil.copytree(tmp_path / "out", tmp_path / "etc-edge-agent"))
    shutil.rmtree(tmp_path / "out")  # the paths in agent.yaml must not lead back to where it was written
    (tmp_path / "elsewhere").mkdir()
    started = subprocess.run(
        [installed / "edge-agent", "run", "--config", etc / "agent.yaml", "--transport", "console", "--max-frames", "10"],
        capture_output=True, text=True, timeout=120, env=agent_env(), cwd=tmp_path / "elsewhere",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    assert {json.loads(line)["model"]["version"] for line in started.stdout.splitlines()} == {"1.2.0"}


def unit_setting(name: str) -> str:
    (value,) = re.findall(rf"^{name}=(.*)$", UNIT.read_text(), re.MULTILINE)
    return value


@pytest.mark.broker
def test_the_systemd_unit_keeps_its_state_in_its_state_directory_whatever_the_working_directory(installed, mosquitto, pki, tmp_path):  # noqa: F811
    """The unit's ExecStart, its /opt, /etc and /var/lib moved under tmp: results spooled by a run that was killed
    while the broker was down are sent by the next run, started from another directory."""
    state = f"/var/lib/{unit_setting('StateDirectory')}"
    places = {"/opt/edge-agent/.venv/bin": str(installed), "/etc/edge-agent": str(tmp_path / "etc"), state: str(tmp_path / "state")}
    command = shlex.split(unit_setting("ExecStart"))
    assert state in command, "the unit passes its StateDirectory as the agent's state_dir"
    command = [next((value.replace(path, place) for path, place in places.items() if value.startswith(path)), value) for value in command]

    etc = tmp_path / "etc"
    etc.mkdir()
    device = pki.client(THING)
    for source, name in ((device.cert, "device.pem.crt"), (device.key, "private.pem.key"), (pki.ca.path, "AmazonRootCA1.pem")):
        shutil.copyfile(source, etc / name)
    settings = {  # as `edge-fleet provision` writes it: file names relative to the settings file
        "thing_name": THING,
        "transport": "mqtt",
        "mqtt": {"endpoint": "127.0.0.1", "port": mosquitto.port, "cert": "device.pem.crt", "key": "private.pem.key", "ca": "AmazonRootCA1.pem",
                 "connect_timeout_s": 2, "min_reconnect_delay_s": 0.1, "max_reconnect_delay_s": 0.5},
        "outbox": {"retry_max_s": 1},
    }  # fmt: skip
    (etc / "agent.yaml").write_text(yaml.safe_dump(settings))
    resolved = load_settings(etc / "agent.yaml", {"state_dir": places[state]})
    assert resolved.outbox.path.parent == resolved.updates.store.parent == Path(places[state])

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    outbox = Path(places[state]) / "outbox.sqlite3"
    mosquitto.stop()
    try:
        agent = subprocess.Popen([*command, "--loop", "--pace-fps", "50"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=agent_env(), cwd=first)
        try:
            spooled = wait_for_spooled(outbox, 20, agent)
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
        finally:
            agent.kill()
        assert list(first.iterdir()) == []
        run_id, sequences = spooled
    finally:
        mosquitto.start()

    with Observer(mosquitto, pki) as observer, IotService(mosquitto, pki):
        observer.subscribe(f"edge/{THING}/inference")
        observer.wait_ready()
        done = subprocess.run([*command, "--max-frames", "10"], capture_output=True, text=True, timeout=120, env=agent_env(), cwd=second)
        assert done.returncode == 0, done.stderr
        received = observer.wait_for(lambda messages: sequences <= sent_sequences(messages, run_id))
    assert sequences <= sent_sequences(received, run_id)


def wait_for_spooled(outbox: Path, count: int, agent: subprocess.Popen) -> tuple[str, set[int]]:
    """(run id, sequences) of the results in the outbox once it holds `count` of them."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert agent.poll() is None, agent.stderr.read()
        try:
            with sqlite3.connect(outbox) as db:
                payloads = [json.loads(payload) for (payload,) in db.execute("SELECT payload FROM outbox WHERE topic = ?", (f"edge/{THING}/inference",))]
        except sqlite3.OperationalError:  # not created yet
            payloads = []
        if len(payloads) >= count:
            return payloads[0]["run_id"], {payload["sequence"] for payload in payloads}
        time.sleep(0.1)
    raise AssertionError(f"{outbox} never held {count} results")


def sent_sequences(messages, run_id: str) -> set[int]:
    return {message["sequence"] for received in messages for message in unbatch(received.payload) if message["run_id"] == run_id}


# --- the settings' path rules ----------------------------------------------------------------------------


def test_defaults_name_what_the_package_ships_not_a_checkout():
    settings = load_settings()
    for path in (settings.model.bundle, *settings.model.trusted_keys, Path(settings.source.spec), settings.mqtt.ca):
        assert path.is_relative_to(PACKAGE) and path.exists(), path
    assert settings.model.trusted_keys == list(DEV_SIGNING_KEYS) and len(DEV_SIGNING_KEYS) == 3
    assert SHIPPED_BUNDLE.resolve() == REPO / "models" / "mnist" / "bundle"  # in a checkout, a link to the one bundle
    assert Path(settings.source.spec).resolve() == SAMPLE_VIDEO


def test_relative_paths_in_a_settings_file_are_relative_to_its_folder(tmp_path):
    config = tmp_path / "device" / "agent.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({
        "mqtt": {"cert": "device.pem.crt", "key": "/abs/private.pem.key", "ca": "~/ca.pem"},
        "model": {"bundle": "model", "trusted_keys": ["fleet.pub"]},
        "source": {"spec": "clip.mp4"},
        "updates": {"download": {"ca_file": "artifacts-ca.pem"}},
    }))  # fmt: skip
    settings = load_settings(config)
    folder = config.parent
    assert (settings.mqtt.cert, settings.mqtt.key, settings.mqtt.ca) == (folder / "device.pem.crt", Path("/abs/private.pem.key"), Path("~/ca.pem").expanduser())
    assert (settings.model.bundle, settings.model.trusted_keys, settings.source.spec) == (folder / "model", [folder / "fleet.pub"], str(folder / "clip.mp4"))
    assert settings.updates.download.ca_file == folder / "artifacts-ca.pem"
    for spec in ("camera:0", "rtsp://cam.local/stream"):
        config.write_text(yaml.safe_dump({"source": {"spec": spec}}))
        assert load_settings(config).source.spec == spec


def test_flag_paths_stay_relative_to_the_current_directory(tmp_path):
    settings = load_settings(flags={"mqtt": {"cert": "device.pem.crt"}, "source": {"spec": "clip.mp4"}})
    assert (settings.mqtt.cert, settings.source.spec) == (Path("device.pem.crt"), "clip.mp4")


def test_state_is_inside_state_dir_wherever_the_agent_starts(tmp_path, own_state_dir, monkeypatch):
    defaults = load_settings()  # state_dir defaults to $XDG_STATE_HOME/edge-agent (conftest points it at tmp_path)
    assert (defaults.state_dir, defaults.outbox.path, defaults.updates.store) == (own_state_dir, own_state_dir / "outbox.sqlite3", own_state_dir / "models")
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"state_dir": "state", "outbox": {"path": "spool/outbox.db"}, "updates": {"store": "/abs/models"}}))
    for cwd in (tmp_path, REPO):
        monkeypatch.chdir(cwd)
        settings = load_settings(config)
        assert settings.state_dir == tmp_path / "state"  # relative to the settings file, like any path in it
        assert settings.outbox.path == tmp_path / "state" / "spool" / "outbox.db"  # a state path: inside state_dir
        assert settings.updates.store == Path("/abs/models")


# --- make train ------------------------------------------------------------------------------------------


def test_make_train_signs_a_scratch_bundle_and_leaves_the_shipped_one_alone():
    """`make -n` prints what `make train` would run (training itself takes minutes and TensorFlow)."""
    plan = subprocess.run(["make", "-n", "-W", ".venv/.installed", "train", "TRAIN_KEY=/keys/mine.key"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert plan.returncode == 0, plan.stderr
    (train,) = [line for line in plan.stdout.splitlines() if "models.mnist.train" in line]
    arguments = shlex.split(train)
    out = Path(arguments[arguments.index("--out") + 1])
    assert arguments[arguments.index("--key") + 1] == "/keys/mine.key"
    assert not (REPO / out).resolve().is_relative_to(REPO / "models")
    assert "edge-fleet model keygen --key /keys/mine.key" in plan.stdout  # a key is made when there is none
    assert f"--model {out} --trusted-key /keys/mine.pub" in plan.stdout  # and it says how to run what it trained
