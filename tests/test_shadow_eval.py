"""Shadow evaluation on real parts: signed bundles fetched over HTTPS, real TFLite, a pipeline serving the
sample video at 30 fps, and IoT Jobs on Mosquitto for the job's progress and outcome.

A candidate in shadow mode is verified like an update, runs beside the serving model on every Nth frame,
never publishes, never delays a serving frame, and ends with figures; promotion swaps in the stored copy.
"""

from __future__ import annotations

import json

import pytest
from agent_process import wait_for
from aws_stand_in import aws, aws_env, client, moto_server, set_job_execution  # noqa: F401 (fixtures)
from broker import mosquitto, pki  # noqa: F401 (fixtures)
from conftest import REPO, SHIPPED_BUNDLE as SHIPPED
from bundle_helpers import test_key  # noqa: F401 (fixture)
from test_fleet_cli import bucket, fleet_aws, unsigned_bundle  # noqa: F401 (fixtures)
from test_greengrass_ipc import greengrass, model_1_0_1  # noqa: F401 (fixtures)
from mjpeg_camera import camera  # noqa: F401 (fixture)
from test_jobs import THING, device, devices, link, service, wait_terminal  # noqa: F401 (fixtures)
from test_updates import _faint_golden, _float_model
from update_helpers import (  # noqa: F401 (fixtures)
    DATA,
    NEW,
    SERVING,
    artifacts,
    document,
    keys,
    make_bundle,
    serving,
)

from agent.bundles.document import Status
from agent.errors import Reason
from agent.messages import Box, Prediction, unbatch
from agent.observe.metrics import Health, Metrics
from agent.updates.manager import Stage
from agent.updates.shadow import compare

PLAN = {"frames": 30, "every_nth": 3, "seconds": 60}


def shadow_document(url: str, data: bytes, **plan) -> dict:
    return document(url, data, mode="shadow", shadow={**PLAN, **plan})


def assert_served_alone(s) -> None:
    """Every frame was served by the serving model, in order, none dropped, none answered by the candidate."""
    s.wait_frames(3)
    s.assert_no_frame_lost()
    assert set(s.log.versions()) == {SERVING}
    assert s.pipeline.source.stats.dropped == 0
    assert s.slot.active.ref.version == SERVING


def test_an_identical_candidate_agrees_fully_and_publishes_nothing(serving, tmp_path, keys, artifacts):
    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key")
    progress = []
    outcome = s.manager.apply(shadow_document(artifacts.publish("/shadow/same.zip", data), data), lambda *step: progress.append(step))

    assert outcome.status == Status.SUCCEEDED, outcome.message
    figures = outcome.shadow
    assert (figures.state, figures.frames, figures.candidate.version) == ("succeeded", 30, NEW)
    assert figures.agreement == figures.box_match == figures.label_agreement == 1.0
    assert figures.score_drift == 0.0 and figures.latency_ratio > 0
    assert figures.frames_served >= 30 * 3
    details = outcome.status_details()
    assert (details["agreement"], details["frames"], details["promoted"]) == ("1.0000", "30", "false")
    assert "not promoted" not in outcome.message and "agreement 1.0000 over 30 frames" in outcome.message
    shadow_steps = [step for step in progress if step[0] == Stage.SHADOW]
    assert shadow_steps[-1] == (Stage.SHADOW, 100, {**{k: details[k] for k in ("candidate", "frames", "skipped", "agreement", "box_match", "label_agreement", "score_drift", "latency_ratio")}})
    assert Stage.ACTIVATING not in [step[0] for step in progress]  # evaluated, never swapped in

    assert_served_alone(s)
    state = s.manager.store.state()
    assert state.active is None and s.manager.store.path("mnist-int8", NEW).is_dir()  # kept for promotion


def test_a_candidate_answering_one_class_agrees_about_a_tenth_and_its_job_says_so(serving, tmp_path, keys, artifacts):
    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key", **_float_model("update-constant.tflite"))
    outcome = s.manager.apply(shadow_document(artifacts.publish("/shadow/constant.zip", data), data, promote_at=0.98))

    assert outcome.status == Status.SUCCEEDED, outcome.message
    figures = outcome.shadow
    assert figures.box_match == 1.0  # the same digits are found: only the labels differ
    assert 0.02 <= figures.agreement <= 0.25, figures
    assert figures.label_agreement == figures.agreement
    details = outcome.status_details()
    assert float(details["agreement"]) == pytest.approx(figures.agreement, abs=1e-4) and details["promoted"] == "false"
    assert "below promote_at 0.98: not promoted" in outcome.message
    assert_served_alone(s)


def test_a_candidate_that_crashes_fails_the_job_and_is_not_kept(serving, tmp_path, keys, artifacts):
    s = serving()
    options = {**_float_model("update-crash.tflite"), "golden": _faint_golden()}
    data = make_bundle(tmp_path, keys / "trusted.key", **options)
    outcome = s.manager.apply(shadow_document(artifacts.publish("/shadow/crash.zip", data), data))

    assert (outcome.status, outcome.reason) == (Status.FAILED, Reason.MODEL_FAILED), outcome.message
    assert "failed in shadow" in outcome.message and "\n" not in outcome.message
    assert outcome.shadow is not None and outcome.shadow.state == "failed"
    assert outcome.status_details()["reason"] == Reason.MODEL_FAILED.value
    assert not s.manager.store.path("mnist-int8", NEW).exists()
    assert_served_alone(s)


def test_a_candidate_that_stalls_fails_its_job_as_stalled_and_is_not_kept(devices, service, tmp_path, keys, artifacts):
    """update-stall.tflite spins for seconds on a bright digit (quick on the faint golden set): past stall_s
    the evaluation gives up on it, while the serving model goes on."""
    device = devices(shadow={"stall_s": 0.5})
    data = make_bundle(tmp_path, keys / "trusted.key", **{**_float_model("update-stall.tflite"), "golden": _faint_golden()})
    device.start_jobs()
    service.queue_job(THING, "stall-1", shadow_document(artifacts.publish("/jobs/stall.zip", data), data))

    execution = wait_terminal(service, "stall-1", timeout_s=60)
    details = execution.status_details
    assert (execution.status, details["reason"]) == ("FAILED", Reason.CANDIDATE_STALLED.value), details
    assert "over 0.5 s on one frame (stalled)" in details["message"] and details["promoted"] == "false"
    assert not device.manager.store.path("mnist-int8", NEW).exists()
    assert_served_alone(device)


def test_a_camera_that_goes_quiet_fails_the_job_with_no_frames(camera, devices, service, tmp_path, keys, artifacts):  # camera first: it stops after the pipeline
    device = devices(source={"spec": camera.url, "loop": False})
    data = make_bundle(tmp_path, keys / "trusted.key")
    device.start_jobs()
    camera.stop()
    wait_for(lambda: device.pipeline.source.stats.reconnects, "the agent to notice the camera is gone", timeout=30, every=0.05)
    service.queue_job(THING, "quiet-1", shadow_document(artifacts.publish("/jobs/quiet.zip", data), data, seconds=2))

    execution = wait_terminal(service, "quiet-1", timeout_s=60)
    details = execution.status_details
    assert (execution.status, details["reason"], details["frames"]) == ("FAILED", Reason.NO_FRAMES.value, "0"), details
    assert "no frame reached the candidate in 2 s" in details["message"]
    assert device.slot.active.ref.version == SERVING and not device.manager.store.path("mnist-int8", NEW).exists()
    camera.start()  # back on the same port: frames flow again
    device.wait_frames(3)


def test_promotion_swaps_in_the_stored_candidate_without_downloading_it_again(serving, tmp_path, keys, artifacts):
    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key")
    url = artifacts.publish("/shadow/promote.zip", data)
    assert s.manager.apply(shadow_document(url, data, frames=6)).status == Status.SUCCEEDED
    outcome = s.manager.apply(document(url, data))  # the same document in serve mode: `edge-fleet model promote`

    assert outcome.status == Status.SUCCEEDED and outcome.shadow is None, outcome.message
    assert s.slot.active.ref.version == NEW and s.manager.store.state().active.version == NEW
    assert [path for path, _ in artifacts.requests].count("/shadow/promote.zip") == 1
    s.wait_frames(3)
    s.assert_no_frame_lost()


def test_a_candidate_reaching_promote_at_is_promoted_through_the_health_window(serving, tmp_path, keys, artifacts):
    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key")
    progress = []
    outcome = s.manager.apply(shadow_document(artifacts.publish("/shadow/auto.zip", data), data, frames=9, promote_at=0.98), lambda *step: progress.append(step[0]))

    assert outcome.status == Status.SUCCEEDED, outcome.message
    assert outcome.shadow.state == "promoted" and outcome.status_details()["promoted"] == "true"
    assert "promoted: mnist-int8" in outcome.message
    assert s.slot.active.ref.version == NEW and s.manager.store.state().active.version == NEW
    assert progress.index(Stage.WATCHING) > progress.index(Stage.SHADOW)  # the normal health window, after the evaluation
    s.wait_frames(3)
    s.assert_no_frame_lost()


def test_shadow_figures_reach_the_metrics_topic_and_prometheus(serving, tmp_path, keys, artifacts):
    s = serving()
    metrics = Metrics(s.pipeline, "console", Health(s.pipeline, 10))
    s.pipeline.add_update_listener(metrics.on_update)
    data = make_bundle(tmp_path, keys / "trusted.key")
    assert s.manager.apply(shadow_document(artifacts.publish("/shadow/metrics.zip", data), data, frames=12)).status == Status.SUCCEEDED
    s.wait_frames(3)  # the last figures are published between two frames

    published = [json.loads(line) for line in s.pipeline.transport._side.getvalue().splitlines()]  # status and metrics
    shadow = [m["shadow"] for m in published if m["kind"] == "metrics" and "shadow" in m]
    assert shadow and shadow[-1]["state"] == "succeeded" and shadow[-1]["agreement"] == 1.0 and shadow[-1]["frames"] == 12
    assert {m["state"] for m in shadow} <= {"running", "succeeded"}
    text = metrics.exposition().decode()
    assert f'edge_agent_shadow_agreement{{candidate="{NEW}",model="mnist-int8"}} 1.0' in text
    assert f'edge_agent_shadow_frames{{candidate="{NEW}",model="mnist-int8"}} 12.0' in text
    assert "edge_agent_shadow_running 0.0" in text


def test_the_retained_status_carries_the_figures_and_fleet_status_shows_them(serving, tmp_path, keys, artifacts, aws):
    from test_fleet_cli import fleet

    s = serving()
    data = make_bundle(tmp_path, keys / "trusted.key")
    assert s.manager.apply(shadow_document(artifacts.publish("/shadow/status.zip", data), data, frames=12)).status == Status.SUCCEEDED
    s.wait_frames(3)

    lines = [line for line in s.pipeline.transport._side.getvalue().splitlines() if json.loads(line)["kind"] == "status"]
    figures = [json.loads(line)["shadow"] for line in lines]
    assert {f["state"] for f in figures} == {"running", "succeeded"} and figures[-1]["state"] == "succeeded"
    final = figures[-1]
    assert (final["agreement"], final["frames"], final["candidate"]["version"]) == (1.0, 12, NEW) and final["latency_ratio"] > 0

    # IoT Core keeps the newest retained message of the status topic (here: Publish with retain=true, the
    # store a device's retained MQTT publish lands in); fleet status reads it device by device.
    client(aws, "iot").create_thing(thingName="cam-1")
    client(aws, "iot-data").publish(topic="edge/cam-1/status", payload=lines[-1].encode(), retain=True, qos=1)
    result = fleet(aws, "fleet", "status", "--json")
    assert result.returncode == 0, result.stderr
    [shown] = json.loads(result.stdout)["devices"]
    assert shown["shadow"] == f"{NEW}: 1.0000 succeeded (12 frames, latency x{final['latency_ratio']:.4f})"
    assert f"{NEW}: 1.0000 succeeded" in fleet(aws, "fleet", "status").stdout.splitlines()[1]


def test_a_shadow_job_reports_progress_and_figures_and_succeeds(device, service, tmp_path, keys, artifacts):
    data = make_bundle(tmp_path, keys / "trusted.key")
    device.start_jobs()
    service.queue_job(THING, "shadow-1", shadow_document(artifacts.publish("/jobs/shadow.zip", data), data, frames=60))

    execution = wait_terminal(service, "shadow-1", timeout_s=60)
    assert execution.status == "SUCCEEDED", execution.status_details
    details = execution.status_details
    assert (details["agreement"], details["frames"], details["promoted"], details["candidate"]) == ("1.0000", "60", "false", NEW)
    progress = [u["statusDetails"] for u in execution.updates if u["status"] == "IN_PROGRESS" and u["statusDetails"]["stage"] == Stage.SHADOW]
    assert progress and all(set(p) >= {"agreement", "frames", "progress", "run"} for p in progress)
    assert all(isinstance(v, str) for p in progress for v in p.values())
    assert device.slot.active.ref.version == SERVING
    device.assert_no_frame_lost()


def box(x: int, y: int, label: str, score: float = 0.9) -> Prediction:
    return Prediction(label=label, class_index=int(label), score=score, box=Box(x=x, y=y, w=10, h=10))


def test_agreement_counts_matched_boxes_by_label_and_the_unmatched_against_it():
    serving = [box(0, 0, "1"), box(50, 50, "2"), box(100, 100, "3")]
    candidate = [box(1, 1, "1", 0.8), box(51, 50, "7", 0.7), box(200, 200, "3")]
    result = compare(serving, candidate)
    assert (result.compared, result.matched, result.agreed) == (3, 2, 1)
    assert result.drift == pytest.approx((0.8 - 0.9) + (0.7 - 0.9))
    assert compare([], []).compared == 0


def test_classifiers_compare_their_top_one():
    plain = lambda label, score: Prediction(label=label, class_index=int(label), score=score)  # noqa: E731
    assert compare([plain("4", 0.9), plain("1", 0.2)], [plain("4", 0.6)]).agreed == 1
    assert compare([plain("4", 0.9)], [plain("5", 0.9)]).agreed == 0
    assert compare([plain("4", 0.9)], []).agreed == 0


def test_greengrass_configuration_runs_a_candidate_in_shadow_then_promotes_it(greengrass, model_1_0_1):
    from test_greengrass_ipc import STATUS, THING as GG_THING, sample

    candidate, test_key = model_1_0_1
    component = greengrass({**sample(loop=True, pace_fps=30), "publish_empty": True, "updates": {"health_frames": 5}})
    nucleus = component.nucleus
    nucleus.wait_for(lambda: component.results())
    trusted = [str(REPO / "models" / "keys" / "dev-signing.pub"), str(test_key)]
    nucleus.update_configuration({"model": {"trusted_keys": trusted}, "shadow": {"candidate": str(candidate), "frames": 15, "every_nth": 3}})

    metrics = f"edge/{GG_THING}/metrics"
    finished = lambda: [m["shadow"] for p in nucleus.published_to(metrics) for m in unbatch(p.payload) if m.get("shadow", {}).get("state") == "succeeded"]  # noqa: E731
    [figures] = nucleus.wait_for(finished)
    assert (figures["candidate"]["version"], figures["frames"], figures["agreement"]) == ("1.0.1", 15, 1.0)
    assert {r["model"]["version"] for r in component.results()} == {SERVING}  # the candidate published nothing
    frames = [r["frame"] for r in component.results()]
    assert frames == list(range(frames[0], frames[0] + len(frames))), "a served frame was lost during the shadow run"

    nucleus.update_configuration({"model": {"bundle": str(candidate)}})  # promote: the same bundle, now served
    nucleus.wait_for(lambda: [m for m in nucleus.published_to(STATUS) if m.json()["model"]["version"] == "1.0.1"])
    code, stderr = component.stop()
    assert code == 0, stderr
    assert not nucleus.denied


# --- the operator's side -----------------------------------------------------------------------------------


def test_fleet_status_shows_each_devices_shadow_agreement(aws, tmp_path):
    from test_fleet_cli import _fleet_of_three, fleet

    job = _fleet_of_three(aws, tmp_path)
    set_job_execution(job, "device-1", "IN_PROGRESS", {"stage": "shadow", "progress": "50", "candidate": "1.1.0", "agreement": "0.9833"})
    set_job_execution(job, "device-2", "SUCCEEDED", {"candidate": "1.1.0", "agreement": "0.9912", "promoted": "true", "message": "promoted"})
    result = fleet(aws, "fleet", "status", "--group", "line-a", "--json")
    assert result.returncode == 0, result.stderr
    assert [d["shadow"] for d in json.loads(result.stdout)["devices"]] == ["1.1.0: 0.9833", "1.1.0: 0.9912 promoted", None]
    table = fleet(aws, "fleet", "status", "--group", "line-a").stdout.splitlines()
    assert "SHADOW" in table[0].split() and "1.1.0: 0.9833" in table[1]


@pytest.mark.parametrize(
    "flags, named",
    [(["--promote-at", "0.9"], "--promote-at: only with --shadow"), (["--shadow", "--promote-at", "1.5"], "--promote-at"), (["--shadow", "--every-nth", "0"], "--every-nth")],
)
def test_bad_shadow_flags_are_one_line_before_anything_is_uploaded(aws, tmp_path, flags, named):
    from test_fleet_cli import ROLE, fleet, fleet_error

    client(aws, "s3").create_bucket(Bucket="edge-models")
    line = fleet_error(fleet(aws, "model", "publish", SHIPPED, "--thing", "t", "--bucket", "edge-models", "--presign-role-arn", ROLE, *flags))
    assert named in line
    assert "Contents" not in client(aws, "s3").list_objects_v2(Bucket="edge-models")


def test_greengrass_publish_in_shadow_deploys_a_candidate_component_and_promote_serves_it(fleet_aws, tmp_path, bucket, unsigned_bundle, test_key):
    from botocore.stub import ANY, Stubber

    from agent.bundles.document import ShadowPlan as RequestedShadow
    from agent.fleet.publish import prepare, upload
    from agent.fleet.rollout import DEFAULT_RECIPE, Rollout, artifact_file_name, load_recipe, roll_out

    recipe = load_recipe(DEFAULT_RECIPE)
    artifact, release = prepare(unsigned_bundle, test_key[0], tmp_path, bucket, artifact_file_name(recipe))
    upload(fleet_aws, artifact, release)
    group = "arn:aws:iot:us-east-1:123456789012:thinggroup/line-a"
    model, candidate = recipe["ComponentName"], recipe["ComponentName"] + ".Candidate"
    agent = {"com.example.EdgeAgent": {"componentVersion": "0.1.0"}}
    deployed = {**agent, model: {"componentVersion": "0.9.0"}}
    version = release.version
    unpacked = f"/greengrass/v2/packages/artifacts-unarchived/{candidate}/{version}/mnist-bundle"

    with Stubber(fleet_aws.client("greengrassv2")) as stub:
        def created(name: str) -> None:
            stub.add_response("create_component_version", {"componentName": name, "componentVersion": version, "creationTimestamp": 0, "status": {}}, {"inlineRecipe": ANY})

        def deployment(components: dict, expected: dict) -> None:
            stub.add_response("list_deployments", {"deployments": [{"deploymentId": "d-1"}]}, {"targetArn": group, "historyFilter": "LATEST_ONLY"})
            stub.add_response("get_deployment", {"deploymentId": "d-1", "components": components}, {"deploymentId": "d-1"})
            stub.add_response("create_deployment", {"deploymentId": "d-2"}, {"targetArn": group, "deploymentName": ANY, "components": expected, "deploymentPolicies": ANY, "iotJobConfiguration": ANY})

        created(candidate)
        shadow_config = {"shadow": {"candidate": unpacked, "frames": 100, "promote_at": 0.98}}
        in_shadow = {**deployed, candidate: {"componentVersion": version}, "com.example.EdgeAgent": {"componentVersion": "0.1.0", "configurationUpdate": {"merge": json.dumps(shadow_config)}}}
        deployment(deployed, in_shadow)
        roll_out(fleet_aws, release, group, "greengrass", Rollout(), presign_role_arn=None, recipe=DEFAULT_RECIPE, new_component=True, shadow=RequestedShadow(frames=100, promote_at=0.98))

        created(model)
        promoted = {model: {"componentVersion": version}, "com.example.EdgeAgent": {"componentVersion": "0.1.0", "configurationUpdate": {"merge": json.dumps({"shadow": {"candidate": None}})}}}
        deployment(in_shadow, promoted)  # the candidate component leaves; the model component serves the release
        roll_out(fleet_aws, release, group, "greengrass", Rollout(), presign_role_arn=None, recipe=DEFAULT_RECIPE, new_component=False, promote=True)
        stub.assert_no_pending_responses()
