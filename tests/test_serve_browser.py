"""The browser demo in headless Chromium: a WAV file as the microphone, speech back over the WebSocket."""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytest.importorskip("fastapi")
pytest.register_assert_rewrite("tests.serve_helpers")

from tests.serve_helpers import ARTIFACTS, espeak_wav, png_bytes, wait_idle  # noqa: E402

pytest_plugins = ["tests.serve_helpers"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} is absent (Debian: apt-get install -y chromium chromium-driver)",
)


def chromium(tmp_path, microphone_wav: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,800",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone_wav}", "--autoplay-policy=no-user-gesture-required",
    ):  # fmt: skip
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


def wait_for(driver, script: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script("return " + script)
        if value:
            return value
        if time.monotonic() > deadline:
            stats = driver.execute_script("return window.thinktalkStats")
            raise AssertionError(f"timed out waiting for `{script}`; page stats: {stats}")
        time.sleep(0.1)


def test_browser_demo_speaks_back(server, tmp_path):
    from selenium.webdriver.common.by import By

    mic = espeak_wav("Hello! What do you see in this picture?", str(tmp_path / "mic.wav"))
    image = tmp_path / "red.png"
    image.write_bytes(png_bytes(96, 64))
    driver = chromium(tmp_path, mic)
    try:
        driver.get(server.url + "/")
        wait_for(driver, "window.thinktalkStats.connected && window.thinktalkStats.session")
        wait_for(driver, "document.getElementById('voice').options.length === 2")
        assert driver.find_element(By.ID, "model").text.startswith(server.model_name)
        driver.execute_script("const s = document.getElementById('voice'); s.value = 'Ethan';"
                              "s.dispatchEvent(new Event('change'));")  # fmt: skip
        wait_for(driver, "window.thinktalkStats.session.audio.output.voice === 'Ethan'")
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait_for(driver, "document.querySelectorAll('#attachments img').length === 1")

        driver.find_element(By.ID, "handsfree").click()  # push-to-talk
        wait_for(driver, "window.thinktalkStats.session.audio.input.turn_detection === null")
        driver.find_element(By.ID, "record").click()
        wait_for(driver, "window.thinktalkStats.recordedSeconds > 1.2", 20)
        driver.find_element(By.ID, "record").click()  # stop: image item + commit + response.create
        wait_for(driver, "window.thinktalkStats.responses >= 1", 90)
        stats = driver.execute_script("return window.thinktalkStats")
        assert stats["errors"] == [], stats["errors"]
        assert stats["audioChunks"] > 0 and stats["audioBytes"] == int(1.0 * 24000) * 2  # max_speech_seconds
        assert stats["transcript"]
        bubbles = driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant .body")
        assert bubbles and bubbles[-1].text.strip()
        assert driver.find_elements(By.CSS_SELECTOR, "#log .msg.user img")  # the image went with the turn
        os.makedirs(ARTIFACTS, exist_ok=True)
        driver.save_screenshot(os.path.join(ARTIFACTS, "serve_browser.png"))
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        driver.quit()
    wait_idle(server.url)


def test_browser_demo_hands_free(server, tmp_path):
    """Open the page, start talking, say nothing more: the server's VAD ends the turn, the answer is spoken, and
    the page shows the end-of-speech to first-audio latency. The fake microphone loops the file, so the next
    utterance talks over the answer (barge-in) as a user would."""
    import numpy as np
    from selenium.webdriver.common.by import By

    from tests.serve_helpers import wav_bytes
    from thinktalk.serve import media

    with open(espeak_wav("What time is it?", str(tmp_path / "q.wav")), "rb") as fh:
        speech = media.decode_audio(fh.read(), "wav", "file", 60)
    silence = np.zeros(16000, np.float32)
    mic = tmp_path / "mic.wav"
    mic.write_bytes(wav_bytes(np.concatenate([silence[:8000], speech, silence, silence]), 16000))
    driver = chromium(tmp_path, str(mic))
    try:
        driver.get(server.url + "/")
        wait_for(driver, "window.thinktalkStats.connected && window.thinktalkStats.session")
        wait_for(driver, "window.thinktalkStats.session.audio.input.turn_detection !== null")
        assert driver.find_element(By.ID, "handsfree").is_selected()
        driver.find_element(By.ID, "record").click()  # open the microphone; no more clicks
        wait_for(driver, "window.thinktalkStats.speechStopped >= 1", 30)
        wait_for(driver, "window.thinktalkStats.responses >= 1 && window.thinktalkStats.latencies.length >= 1", 60)
        stats = driver.execute_script("return window.thinktalkStats")
        assert stats["errors"] == [], stats["errors"]
        assert stats["speechStarted"] >= 1 and stats["audioChunks"] > 0
        assert 0 < stats["latencies"][0] < 5000
        metas = driver.find_elements(By.CSS_SELECTOR, "#log .msg.assistant .meta")
        assert any("first audio" in m.text for m in metas)
        os.makedirs(ARTIFACTS, exist_ok=True)
        driver.save_screenshot(os.path.join(ARTIFACTS, "serve_browser_hands_free.png"))
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
        driver.find_element(By.ID, "record").click()  # stop listening
    finally:
        driver.quit()
    wait_idle(server.url)
