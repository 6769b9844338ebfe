"""Shadow evaluation: a verified candidate runs beside the serving model on sampled live frames.

The candidate never publishes and never delays a serving frame. On the pipeline thread, `ShadowTap` (an
observer) only keeps a reference to every Nth frame and to what the serving model made of it, and only when
the candidate is free and within its CPU budget; otherwise the frame is skipped and counted. The candidate
infers on its own thread, at a lower scheduling priority. The update thread waits, reports progress, and
judges: the evaluation ends after N frames or T seconds, and fails if the candidate raises or stalls.

Agreement is per prediction (see agent.messages.ShadowFigures): boxes are matched at IoU 0.5 and a matched
pair agrees when its labels are equal; predictions without boxes (a classifier) compare their top-1.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from agent.errors import Reason
from agent.inference.model import LoadedModel
from agent.messages import ModelRef, Prediction, ShadowFigures
from agent.sources import Frame

log = logging.getLogger(__name__)

IOU_MATCH = 0.5
LATENCY_WINDOW = 1000  # frames kept for the latency medians
JOIN_S = 2.0  # how long the end of an evaluation waits for the candidate's thread (a stalled one is left behind)


@dataclass(frozen=True)
class ShadowPlan:
    """The evaluation's limits, resolved from the job document over the device's shadow settings."""

    frames: int
    seconds: float
    every_nth: int
    cpu_budget: float  # cores
    stall_s: float
    promote_at: float | None = None
    nice: int = 10


@dataclass(frozen=True)
class Comparison:
    """One frame: how many predictions were compared, matched and agreed, and the score differences."""

    compared: int
    matched: int
    agreed: int
    drift: float  # sum over matched pairs of candidate score - serving score


def compare(serving: Sequence[Prediction], candidate: Sequence[Prediction]) -> Comparison:
    """The two models' predictions for one frame, side by side. A frame where neither predicts anything
    (above the score threshold) is no evidence either way: it counts nowhere."""
    if not serving and not candidate:
        return Comparison(0, 0, 0, 0.0)
    if not any(p.box for p in (*serving, *candidate)):  # a classifier: its top-1
        if not serving or not candidate:
            return Comparison(1, 0, 0, 0.0)
        top = [max(side, key=lambda p: p.score) for side in (serving, candidate)]
        return Comparison(1, 1, int(top[0].label == top[1].label), top[1].score - top[0].score)
    pairs = sorted(
        ((s.box.iou(c.box), i, j) for i, s in enumerate(serving) for j, c in enumerate(candidate) if s.box and c.box),
        reverse=True,
    )
    used_s, used_c, agreed, drift = set(), set(), 0, 0.0
    for overlap, i, j in pairs:
        if overlap < IOU_MATCH:
            break
        if i in used_s or j in used_c:
            continue
        used_s.add(i)
        used_c.add(j)
        agreed += serving[i].label == candidate[j].label
        drift += candidate[j].score - serving[i].score
    return Comparison(max(len(serving), len(candidate)), len(used_s), agreed, drift)


class Tally:
    """Running sums over the frames evaluated so far."""

    def __init__(self):
        self.frames = self.compared = self.matched = self.agreed = 0
        self.drift = 0.0
        self.candidate_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.serving_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def add(self, comparison: Comparison, candidate_ms: float, serving_ms: float) -> None:
        self.frames += 1
        self.compared += comparison.compared
        self.matched += comparison.matched
        self.agreed += comparison.agreed
        self.drift += comparison.drift
        self.candidate_ms.append(candidate_ms)
        self.serving_ms.append(serving_ms)

    def ratios(self) -> dict[str, float | None]:
        def share(part: float, whole: float) -> float | None:
            return part / whole if whole else None

        serving = statistics.median(self.serving_ms) if self.serving_ms else 0.0
        return {
            "agreement": share(self.agreed, self.compared) if self.frames else None,
            "box_match": share(self.matched, self.compared) if self.frames else None,
            "label_agreement": share(self.agreed, self.matched),
            "score_drift": share(self.drift, self.matched),
            "latency_ratio": share(statistics.median(self.candidate_ms), serving) if self.candidate_ms else None,
        }


@dataclass(frozen=True)
class Sample:
    frame: Frame
    serving: list[Prediction]
    serving_ms: float
    threshold: float


@dataclass(frozen=True)
class ShadowDisagreement:
    """A frame on which the candidate disagreed with the serving model (what data capture keeps)."""

    frame: Frame
    serving: list[Prediction]
    candidate: list[Prediction]
    candidate_model: ModelRef
    threshold: float


class ShadowRun:
    """One candidate's evaluation: it is offered frames (pipeline thread), infers them (its own thread),
    and is judged by `run` (the update thread)."""

    def __init__(self, candidate: LoadedModel, plan: ShadowPlan, on_disagreement: Callable[[ShadowDisagreement], None] | None = None):
        self.candidate = candidate
        self.plan = plan
        self._on_disagreement = on_disagreement
        self.tally = Tally()
        self.served = 0
        self.skipped = 0
        self.failure: tuple[Reason, str] | None = None
        self._lock = threading.Lock()
        self._pending: Sample | None = None
        self._not_before = 0.0  # monotonic time before which the CPU budget allows no new frame
        self._busy_since: float | None = None
        self._wake = threading.Event()
        self._done = threading.Event()
        self._closed = False
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="shadow-candidate", daemon=True)

    # -- the pipeline thread: store a reference, never wait ----------------------------------------------

    def offer(self, frame: Frame, serving: list[Prediction], serving_ms: float, threshold: float) -> None:
        if self._closed:
            return
        self.served += 1
        if self.served % self.plan.every_nth:
            return
        if self._pending is not None or time.monotonic() < self._not_before:
            self.skipped += 1
            return
        self._pending = Sample(frame, serving, serving_ms, threshold)
        self._wake.set()

    # -- the candidate's thread ---------------------------------------------------------------------------

    def _work(self) -> None:
        if self.plan.nice:
            try:  # Linux schedules threads one by one: only this one yields to the serving model
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(os.getpriority(os.PRIO_PROCESS, 0) + self.plan.nice, 19))
            except (OSError, AttributeError):
                pass
        while not self._closed:
            if not self._wake.wait(0.5):
                continue
            self._wake.clear()
            sample = self._pending
            if sample is None or self._closed:
                continue
            started, cpu = time.monotonic(), time.thread_time()
            self._busy_since = started
            try:
                inference = self.candidate.infer(sample.frame.image, sample.threshold)
            except Exception as exc:  # noqa: BLE001 -- any fault of the candidate ends its evaluation, not the agent
                self.failure = (Reason.MODEL_FAILED, f"the candidate raised {type(exc).__name__} on a live frame: {exc}")
                self._done.set()
                return
            finally:
                self._busy_since = None
            elapsed_ms = (time.monotonic() - started) * 1e3
            comparison = compare(sample.serving, inference.predictions)
            with self._lock:
                self.tally.add(comparison, elapsed_ms, sample.serving_ms)
                frames = self.tally.frames
            if comparison.agreed < comparison.compared and self._on_disagreement is not None:
                self._on_disagreement(ShadowDisagreement(sample.frame, sample.serving, inference.predictions, self.candidate.ref, sample.threshold))
            self._not_before = started + (time.thread_time() - cpu) / self.plan.cpu_budget
            self._pending = None
            if frames >= self.plan.frames:
                self._done.set()
                return

    # -- the update thread ------------------------------------------------------------------------------

    def run(self, report: Callable[[ShadowFigures, int], None], interval_s: float = 1.0) -> ShadowFigures:
        """Evaluate until the plan's frames or seconds, a crash or a stall; report progress every `interval_s`
        (figures and percent done). Returns the final figures; `failure` says why it failed, if it did."""
        self._started = time.monotonic()
        self._thread.start()
        deadline = self._started + self.plan.seconds
        try:
            while not self._done.wait(max(min(interval_s, deadline - time.monotonic()), 0)):
                now = time.monotonic()
                busy = self._busy_since
                if busy is not None and now - busy > self.plan.stall_s:
                    self.failure = (Reason.CANDIDATE_STALLED, f"the candidate spent over {self.plan.stall_s:g} s on one frame (stalled)")
                    break
                if now >= deadline:
                    break
                report(self.figures("running"), self.percent())
        finally:
            self._closed = True
            self._wake.set()
            self._thread.join(JOIN_S)
        if self.failure is None and self.tally.frames == 0:
            self.failure = (Reason.NO_FRAMES, f"no frame reached the candidate in {self.plan.seconds:g} s; check that the source delivers frames")
        return self.figures("failed" if self.failure else "succeeded")

    def percent(self) -> int:
        done = max(self.tally.frames / self.plan.frames, (time.monotonic() - self._started) / self.plan.seconds)
        return min(int(done * 100), 100)

    def figures(self, state: Literal["running", "succeeded", "failed", "promoted"]) -> ShadowFigures:
        with self._lock:
            ratios = self.tally.ratios()
            frames = self.tally.frames
        return ShadowFigures(
            candidate=self.candidate.ref,
            state=state,
            frames=frames,
            frames_served=self.served,
            frames_skipped=self.skipped,
            elapsed_s=round(time.monotonic() - self._started, 3),
            reason=self.failure[0].value if self.failure else None,
            **ratios,
        )


class ShadowTap:
    """The pipeline observer that hands sampled frames to the evaluation running now, if any.

    One per update manager for the agent's life (the pipeline keeps its observers); `threshold` reads the
    score threshold the serving model used, so the candidate is held to the same one."""

    def __init__(self, threshold: Callable[[], float]):
        self._threshold = threshold
        self.run: ShadowRun | None = None

    def on_frame(self, frame, result, latency_ms: float) -> None:
        run = self.run
        if run is not None:
            run.offer(frame, result.predictions if result is not None else [], latency_ms, self._threshold())


def status_details(figures: ShadowFigures) -> dict[str, str]:
    """The figures as IoT Jobs statusDetails entries (strings only, as IoT Jobs requires)."""
    details = {"candidate": figures.candidate.version, "frames": str(figures.frames), "skipped": str(figures.frames_skipped)}
    for key in ("agreement", "box_match", "label_agreement", "score_drift", "latency_ratio"):
        value = getattr(figures, key)
        if value is not None:
            details[key] = f"{value:.4f}"
    return details
