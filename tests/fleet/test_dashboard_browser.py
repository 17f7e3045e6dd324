"""End to end in headless Chromium: a fleet on a real Mosquitto, simulated agents, the dashboard.

The fleet side is real: :class:`IngestService` subscribed on Mosquitto, the SQLite
registry, the core's FastAPI app with the dashboard mounted, served by uvicorn, and the
real :class:`RolloutDriver` sending deploy/rollback commands over MQTT.  The agents are
scripted devices that speak the wire protocol (``core.protocol``, chunked samples
encoded with ``core.sampling``) over real MQTT: birth/Last Will, telemetry, drift
reports (shifted inputs raise the alarm), samples, and job statuses answering commands.
They do not fetch or verify bundles — the agent's own tests cover that.

Every page is checked and photographed twice: at desktop width (1400 px) and at 400 px,
where nothing may scroll sideways.  The screenshots go to ``$EDGELOOP_SCREENSHOTS`` (default
``tests/fleet/artifacts/screenshots/``, which the test prints) and, with
``EDGELOOP_SCREENSHOTS_TO_DOCS=1``, to ``docs/screenshots/`` as well.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("chromium / chromedriver not installed: apt-get install -y chromium chromium-driver",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
pytest.importorskip("uvicorn")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from core import chunks  # noqa: E402
from core.protocol import (  # noqa: E402
    SAMPLES_KIND,
    DeployCommand,
    DeviceState,
    DriftReportMsg,
    JobStatus,
    RollbackCommand,
    Telemetry,
    TopicScheme,
    decode,
)
from core.sampling import DriftSample, encode_sample  # noqa: E402
from tests.plugins.broker import free_port  # noqa: E402

pytestmark = pytest.mark.broker

ARTIFACTS = Path(os.environ.get("EDGELOOP_SCREENSHOTS") or Path(__file__).parent / "artifacts" / "screenshots")
WIDTHS = (("desktop", 1400), ("400px", 400))
DOCS_SHOTS = Path(__file__).parents[2] / "docs" / "screenshots"
TOKEN = "e2e-operator-token-0123456789"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * 15.9).astype(np.uint8), d.target.astype(np.int64)


class SimAgent:
    """A scripted device on real MQTT: state + Will, telemetry, drift, samples, answers to commands."""

    def __init__(self, device_id: str, port: int, topics: TopicScheme, images: np.ndarray, labels: np.ndarray,
                 *, seed: int) -> None:
        import paho.mqtt.client as mqtt

        self.id, self.topics = device_id, topics
        self.images, self.labels = images, labels
        self.rng = np.random.default_rng(seed)
        self.version, self.previous = "1", None
        self.shifted = False
        self.seq = 0
        self.inferences = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sim-{device_id}")
        will = DeviceState(device_id, False, model_name="digits", model_version="1")
        self.client.will_set(topics.device(device_id, "state"), will.encode(), qos=1, retain=True)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_a: c.subscribe(topics.device_commands(device_id), qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.publish_state()

    def publish_state(self) -> None:
        st = DeviceState(self.id, True, model_name="digits", model_version=self.version, variant="fp32",
                         variants=("fp32",), delivery=("mqtt",), previous_version=self.previous,
                         hardware={"machine": "sim", "group": "cams-north" if self.id in NORTH else "cams-south"})
        self.client.publish(self.topics.device(self.id, "state"), st.encode(), qos=1, retain=True)

    def _job(self, job_id: str, version: str, step: str, **kw: Any) -> None:
        msg = JobStatus(self.id, job_id, version, step, **kw)
        self.client.publish(self.topics.device(self.id, "jobs"), msg.encode(), qos=1)

    def _on_message(self, _c: Any, _u: Any, m: Any) -> None:
        msg = decode(m.payload)
        if isinstance(msg, DeployCommand):
            self._job(msg.job_id, msg.version, "received")
            self._job(msg.job_id, msg.version, "installing", progress=1.0)
            self.previous, self.version = self.version, msg.version
            self._job(msg.job_id, msg.version, "completed", previous_version=self.previous)
            self.publish_state()
        elif isinstance(msg, RollbackCommand):
            target = msg.to_version or self.previous or self.version
            self._job(msg.job_id, target, "rolled_back", detail=msg.reason, previous_version=self.version)
            self.previous, self.version = self.version, target
            self.publish_state()

    def step(self) -> None:
        """One reporting period: telemetry, a drift window, and a sample when shifted."""
        self.seq += 1
        self.inferences += 50
        # Version 2 was retrained on the shifted cameras' samples: it serves them well.
        struggling = self.shifted and self.version != "2"
        risk = float(0.85 + 0.1 * self.rng.random()) if struggling else float(0.1 * self.rng.random())
        tel = Telemetry(self.id, self.seq, model_version=self.version, inferences=self.inferences,
                        inferences_interval=50, latency_p50_ms=1.0 + 0.2 * self.rng.random(),
                        latency_p99_ms=2.5 + self.rng.random(), mean_confidence=0.55 if struggling else 0.95,
                        queue_depth=int(self.rng.integers(0, 6)), drift_alarm=struggling,
                        cpu_percent=round(8.0 + 6.0 * float(self.rng.random()), 1),
                        memory_mb=round(42.0 + float(self.rng.random()), 1))
        drift = DriftReportMsg(self.id, self.seq, window=self.seq, n=50, model_version=self.version, risk=risk,
                               alarm=struggling, input_shift=self.shifted, mean_confidence=tel.mean_confidence,
                               scores={"ks": risk})
        self.client.publish(self.topics.device(self.id, "telemetry"), tel.encode(), qos=1)
        self.client.publish(self.topics.device(self.id, "drift"), drift.encode(), qos=1)
        if self.shifted and self.seq % 2 == 0:
            i = int(self.rng.integers(len(self.images)))
            img = (self.images[i] // 3)[::-1]  # darker and upside down: the camera moved
            s = DriftSample(f"{self.id}-{self.seq}", self.id, time.time(), self.version, int(self.labels[i]) % 10,
                            0.4 + 0.2 * float(self.rng.random()), risk * 3, "drift", np.ascontiguousarray(img))
            for frame in chunks.split(s.sample_id, encode_sample(s), chunk_size=1024, kind=SAMPLES_KIND,
                                      meta={"reason": s.reason, "model_version": s.model_version}):
                self.client.publish(self.topics.device(self.id, "samples"), frame, qos=1)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


SHIFTED = {"cam-01", "cam-02"}
NORTH = {"cam-00", "cam-01", "cam-02", "cam-03"}  # the agents report their group; rollouts may target it


class Fleet:
    """The real fleet side: ingestion, registry, rollout driver ticking, API + dashboard over HTTP."""

    def __init__(self, tmp: Path, broker_port: int, prefix: str) -> None:
        import uvicorn
        from fastapi import FastAPI

        from core.signing import save_keypair
        from fleet.config import ApiConfig, BrokerConfig, RolloutConfig, default_config
        from fleet.dashboard import DashboardConfig, mount_dashboard
        from fleet.dashboard.data import DashContext
        from fleet.ingest import IngestService, connect_client
        from fleet.registry import Registry
        from fleet.rollout_driver import RolloutDriver
        from fleet.setup import trust_key
        from tests.plugins.agent_kit import make_bundle

        try:
            from fleet.api import create_app
        except ImportError:  # the core's API not there yet: the dashboard alone
            create_app = None
        port = free_port()
        self.cfg = default_config(tmp / "fleet-data", prefix=prefix, broker=BrokerConfig(port=broker_port),
                                  api=ApiConfig(port=port),
                                  dashboard=DashboardConfig(operator_token=TOKEN, refresh_s=0.5),
                                  # simulated agents: too little telemetry to judge; proceed (with a warning)
                                  rollout=RolloutConfig(canary_max_extension_s=0.0))
        self.registry = Registry.open(self.cfg.database_url)
        # bundles to upload from the models page: one signed by a key the fleet trusts, one by a stranger's
        mine = save_keypair(tmp / "me")
        trust_key(self.cfg, mine.public)
        self.trusted_bundle = make_bundle(tmp / "upload" / "tiny-mlp.elb", signing_key=mine.private)
        self.untrusted_bundle = make_bundle(tmp / "upload" / "stranger.elb",
                                            signing_key=save_keypair(tmp / "stranger").private)
        self.ingest = IngestService(self.cfg, self.registry, client_id="fleet-ingest-e2e")
        self.ingest.start()
        self.client, _ = connect_client(self.cfg.broker, client_id="fleet-cmd-e2e")
        self.driver = RolloutDriver(self.registry, self.client, topics=TopicScheme(prefix), delivery="mqtt")
        bundle = tmp / "digits-2.elb"
        bundle.write_bytes(b"bundle bytes: the simulated agents do not fetch it")
        now = time.time()
        self.registry.add_model_version("digits", "1", status="accepted", bundle_path=str(bundle), sha256="1" * 64,
                                        size=bundle.stat().st_size, signed_by="fleet", lineage={"run_id": "base"},
                                        metrics={"variants": {"fp32": {"test_accuracy": 0.98, "accuracy_drop": 0.0,
                                                                       "latency_ms": 1.1, "size": 90_000}}},
                                        created=now - 60)
        self.registry.add_model_version("digits", "2", status="accepted", parent_version="1",
                                        bundle_path=str(bundle), sha256="2" * 64, size=bundle.stat().st_size,
                                        signed_by="fleet", lineage={"trigger": "drift", "n_labelled": 240},
                                        metrics={"variants": {"fp32": {"test_accuracy": 0.975, "accuracy_drop": 0.0,
                                                                       "latency_ms": 1.1, "size": 90_000}},
                                                 "gate": {"holdout_current": 0.62, "holdout_candidate": 0.91,
                                                          "test_current": 0.98, "test_candidate": 0.975,
                                                          "n_holdout": 72, "n_train": 168, "variant": "fp32",
                                                          "min_improvement": 0.02, "max_original_drop": 0.01,
                                                          "passed": True}}, created=now - 30)
        self.registry.add_model_version("digits", "3", status="rejected", parent_version="2",
                                        reason="gate: +0.4 points on held-out drift samples < 2.0 required",
                                        created=now - 20)
        self.ctx = DashContext.for_fleet(self.cfg, self.registry, driver=self.driver)
        if create_app is not None:  # `fleet serve`'s app, which mounts the dashboard from [dashboard]
            app = create_app(self.cfg, self.registry, ctx=self.ctx)
        else:
            app = FastAPI()
            mount_dashboard(app, self.ctx, self.cfg.dashboard)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    access_log=False, lifespan="off"))
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.server.run, daemon=True),
                         threading.Thread(target=self._tick, daemon=True)]
        for t in self._threads:
            t.start()
        while not self.server.started:
            self._stop.wait(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            self.driver.tick()

    def stop(self) -> None:
        self._stop.set()
        self.server.should_exit = True
        for t in self._threads:
            t.join(10)
        self.client.disconnect()
        self.client.loop_stop()
        self.ingest.stop()
        self.registry.close()


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Any]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        opts.add_argument(flag)
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield drv
    finally:
        drv.quit()


def _emulate(drv: Any, width: int, height: int) -> None:
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


def shot(drv: Any, name: str) -> list[Path]:
    """Full-page PNGs of the current page at desktop width and at 400 px, where nothing may scroll sideways."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for label, width in WIDTHS:
            _emulate(drv, width, 900)
            height = int(drv.execute_script("return document.documentElement.scrollHeight"))
            _emulate(drv, width, min(4000, max(900, height)))
            if width < 600:
                wide = drv.execute_script(
                    "const w = document.documentElement.clientWidth; "
                    "return Array.from(document.querySelectorAll('main *, header *')).filter("
                    "e => e.getBoundingClientRect().right > w + 1 && e.offsetParent !== null)"
                    ".slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className);")
                scroll = drv.execute_script("return document.documentElement.scrollWidth - "
                                            "document.documentElement.clientWidth")
                assert scroll <= 0 and not wide, f"{name} scrolls sideways at {width} px: {wide}"
            path = ARTIFACTS / f"{name}-{label}.png"
            drv.save_screenshot(str(path))
            paths.append(path)
            if os.environ.get("EDGELOOP_SCREENSHOTS_TO_DOCS") == "1":
                DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, DOCS_SHOTS / path.name)
    finally:
        drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return paths


def text_of(drv: Any, css: str) -> str:
    """Text of the first match, read in one script call (the live refresh may swap elements any time)."""
    return str(drv.execute_script("const e = document.querySelector(arguments[0]); "
                                  "return e ? e.textContent.trim() : '';", css))


def texts_of(drv: Any, css: str) -> set[str]:
    return set(drv.execute_script("return Array.from(document.querySelectorAll(arguments[0]))"
                                  ".map(e => e.textContent.trim());", css))


def click(drv: Any, css: str) -> None:
    """Click, retrying when the live refresh replaced the element between finding and clicking."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            drv.find_element(By.CSS_SELECTOR, css).click()
            return
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"could not click {css}")


def test_operator_journey_in_chromium(broker: Any, tmp_path: Path, chrome: Any, topic_prefix: str) -> None:
    fleet = Fleet(tmp_path, broker.port, topic_prefix)
    agents: list[SimAgent] = []
    stop = threading.Event()
    wait = WebDriverWait(chrome, 60, poll_frequency=0.2)
    print(f"\nscreenshots: {ARTIFACTS}")

    def report() -> None:
        while not stop.wait(0.25):
            for a in list(agents):
                a.step()

    reporter = threading.Thread(target=report, daemon=True)
    try:
        # 1. log in
        chrome.get(fleet.url + "/dashboard/")
        assert "/dashboard/login" in chrome.current_url
        shot(chrome, "01-login")
        chrome.find_element(By.ID, "token").send_keys(TOKEN)
        chrome.find_element(By.ID, "login-submit").click()
        wait.until(lambda d: d.find_elements(By.ID, "stat-online"))
        assert text_of(chrome, "#stat-devices b") == "0"

        # 2. devices appear while the page is open (live refresh)
        images, labels = _digits()
        agents.extend(SimAgent(f"cam-{i:02d}", broker.port, TopicScheme(topic_prefix), images, labels, seed=i)
                      for i in range(8))
        reporter.start()
        wait.until(lambda d: text_of(d, "#stat-online b") == "8")
        assert text_of(chrome, "#stat-alarming b") == "0"

        # 3. shifted inputs on two cameras -> drift alarm on the overview
        for a in agents:
            a.shifted = a.id in SHIFTED
        wait.until(lambda d: text_of(d, "#stat-alarming b") == "2")
        wait.until(lambda d: int(text_of(d, "#stat-unlabelled b") or 0) >= 12)
        assert texts_of(chrome, "#alarms td a") == SHIFTED
        assert "more labelled samples" in text_of(chrome, "#labels-needed")
        assert chrome.find_element(By.ID, "metrics-link").get_attribute("href").endswith("/metrics")
        shot(chrome, "02-overview-drift-alarm")
        chrome.get(fleet.url + "/dashboard/drift")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#alarm-windows tr.alarm-row"))
        shot(chrome, "03-drift")
        chrome.get(fleet.url + "/dashboard/devices")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#devices-table tr[data-device]")) == 8)
        assert texts_of(chrome, "#devices-table td:nth-child(3)") == {"cams-north", "cams-south"}  # group column
        assert "vNone" not in chrome.page_source
        shot(chrome, "04-devices")
        chrome.get(fleet.url + "/dashboard/devices/cam-01")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".thumbs img"))
        wait.until(lambda d: d.execute_script(
            "return Array.from(document.querySelectorAll('.thumbs img')).every(i => i.complete && i.naturalWidth > 0)"))
        for chart in ("#cpu-chart polyline", "#memory-chart polyline"):
            wait.until(lambda d, c=chart: d.find_elements(By.CSS_SELECTOR, c))
        assert chrome.find_elements(By.ID, "btn-logs") and text_of(chrome, "#logs h2").startswith("Agent log")
        shot(chrome, "05-device-alarmed")
        click(chrome, "#nav-samples")
        wait.until(lambda d: "/dashboard/samples" in d.current_url and d.find_elements(By.CSS_SELECTOR, ".thumbs img"))
        shot(chrome, "06-samples")

        # 4. label samples: a key press on the selected card, then a click on a class button
        chrome.get(fleet.url + "/dashboard/labels")
        first = chrome.find_element(By.CSS_SELECTOR, ".label-card.selected").get_attribute("data-sample")
        before = int(text_of(chrome, "#unlabelled-count"))
        chrome.find_element(By.TAG_NAME, "body").send_keys("3")
        wait.until(lambda d: d.execute_script("return document.body.dataset.labelled") == "1")
        second = chrome.find_element(By.CSS_SELECTOR, ".label-card.selected")
        second_id = second.get_attribute("data-sample")
        second.find_element(By.CSS_SELECTOR, 'button.cls[value="7"]').click()
        wait.until(lambda d: d.execute_script("return document.body.dataset.labelled") == "2")
        assert fleet.registry.sample(first).label == "3"
        assert fleet.registry.sample(second_id).label == "7"
        assert int(text_of(chrome, "#unlabelled-count")) == before - 2
        shot(chrome, "07-labelling")
        chrome.get(fleet.url + "/dashboard/drift")  # concept drift (fleet.concept_drift) counts labels of v2 only:
        wait.until(lambda d: d.find_elements(By.ID, "concept-drift"))  # "the model in service" is the newest accepted
        shot(chrome, "08-drift-concept")

        # 5. register models from the models page: a stranger's bundle is refused, a trusted one registered
        chrome.get(fleet.url + "/dashboard/models")
        chrome.find_element(By.ID, "bundle-file").send_keys(str(fleet.untrusted_bundle))
        chrome.find_element(By.ID, "upload-submit").click()
        wait.until(lambda d: d.find_elements(By.ID, "flash-error"))
        assert "not trusted" in text_of(chrome, "#flash-error") and fleet.registry.model("tiny-mlp", "1.0.0") is None
        shot(chrome, "09-models-upload-refused")
        chrome.find_element(By.ID, "bundle-file").send_keys(str(fleet.trusted_bundle))
        chrome.find_element(By.ID, "upload-submit").click()
        wait.until(lambda d: "registered tiny-mlp 1.0.0" in text_of(d, "#flash"))
        assert fleet.registry.model("tiny-mlp", "1.0.0").status == "accepted"

        # 6. roll v2 out to the cams-north group from the models page and watch it finish
        form = chrome.find_element(By.CSS_SELECTOR, "#model-2 form.rollout-form")
        for name, value in [("target", "group=cams-north"), ("canary", "25%"), ("waves", "50,100"), ("soak", "1s"),
                            ("max_failures", "0%")]:
            field = form.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)
        assert chrome.find_elements(By.CSS_SELECTOR, "#gate-2 tr")
        assert "Rejected" in chrome.find_element(By.ID, "model-3").text
        assert "{" not in chrome.find_element(By.ID, "model-2").text  # no raw dict
        shot(chrome, "10-models")
        chrome.find_element(By.ID, "rollout-2").click()
        wait.until(lambda d: "/dashboard/rollouts/ro-" in d.current_url)
        rid = chrome.current_url.split("/dashboard/rollouts/")[1].split("?")[0]
        wait.until(lambda d: text_of(d, "#rollout-status") == "completed")
        wait.until(lambda d: "completed, 3 of 3 waves" in text_of(d, "#rollout-progress"))
        assert "group=cams-north" in text_of(chrome, "#rollout-progress")
        assert {d.id for d in fleet.registry.devices() if d.model_version == "2"} == NORTH
        shot(chrome, "11-rollout-completed")
        chrome.get(fleet.url + "/dashboard/rollouts")
        shot(chrome, "12-rollouts")

        # 7. roll it back from its page
        chrome.get(fleet.url + f"/dashboard/rollouts/{rid}")
        click(chrome, "#btn-rollback")
        wait.until(lambda d: _accept_alert(d))
        wait.until(lambda d: text_of(d, "#rollout-status") == "rolled_back")
        assert fleet.registry.rollout(rid).status == "rolled_back"
        wait.until(lambda _d: all(d.model_version == "1" for d in fleet.registry.devices()))
        shot(chrome, "13-rollout-rolled-back")
        chrome.get(fleet.url + "/dashboard/devices/cam-01")
        history = text_of(chrome, "#history")
        assert "rollback" in history and "install" in history
        shot(chrome, "14-device-history")
        chrome.get(fleet.url + "/dashboard/")
        wait.until(lambda d: d.find_elements(By.ID, "stat-online"))
        shot(chrome, "15-overview-after")
    finally:
        stop.set()
        if reporter.is_alive():
            reporter.join(5)
        for a in agents:
            a.stop()
        fleet.stop()


def _accept_alert(drv: Any) -> bool:
    try:
        drv.switch_to.alert.accept()
        return True
    except Exception:  # noqa: BLE001 - the confirm dialog is not open yet
        return False
