"""The browser softphone (/phone), driven in a real headless Chromium.

A real microphone is replaced by Chromium's fake capture device playing a WAV
that espeak-ng speaks here; the real bridge runs as a subprocess (main.py) and
talks to a fake Deepgram agent in this process. The page must speak Twilio
Media Streams exactly as Twilio does, play the agent, honour clear and marks,
and show transcript, function calls and latency.

Needs Debian's chromium, espeak-ng and sox. Without them each test is skipped, saying what to
install; under CI (the ``CI`` environment variable set) each fails with that sentence instead.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Debian's Chromium; tests/test_missing_tools.py points this elsewhere to see a machine without it.
CHROMIUM = os.environ.get("PHONE_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
TOKEN = "phone-test-token-7f3a9c"
SPEECH = "I would like to order ibuprofen please"

try:
    from playwright.async_api import async_playwright
except ImportError:  # pragma: no cover - environment dependent
    async_playwright = None

import websockets  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import cannot_run, free_port, require_tools  # noqa: E402
from fakes import FakeAgent, eventually  # noqa: E402

pytestmark = pytest.mark.timeout(120)
APT_PACKAGES = {"chromium": "Debian's chromium", "espeak-ng": "espeak-ng", "sox": "sox"}


@pytest.fixture(scope="module")
def browser_tools() -> None:
    """The browser tests need Chromium, espeak-ng, sox and playwright: skip, or under CI fail, without."""
    missing_packages = [
        package for package in APT_PACKAGES
        if (not Path(CHROMIUM).exists() if package == "chromium" else shutil.which(package) is None)
    ]
    missing = [APT_PACKAGES[package] for package in missing_packages]
    install = []
    if missing_packages:
        install.append(f"sudo apt-get install {' '.join(missing_packages)}")
    if async_playwright is None:
        missing.append("playwright")
        install.append("pip install -r requirements-dev.txt")
    require_tools(missing, " and ".join(install))


# --------------------------------------------------------------------------- audio helpers

def _mulaw_table() -> list[float]:
    table = []
    for i in range(256):
        u = ~i & 0xFF
        sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
        s = (((mantissa << 3) + 0x84) << exponent) - 0x84
        table.append((-s if sign else s) / 32768.0)
    return table


MULAW = _mulaw_table()


def mulaw_decode(data: bytes) -> list[float]:
    return [MULAW[b] for b in data]


def mulaw_encode_sample(x: float) -> int:
    s = max(-32768, min(32767, int(round(x * 32767))))
    sign = 0
    if s < 0:
        sign, s = 0x80, -s
    s = min(s, 32635) + 0x84
    exponent = max(0, (s >> 7).bit_length() - 1) if (s >> 7) else 0
    mantissa = (s >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def tone_mulaw(seconds: float, freq: float = 440.0, amp: float = 0.3) -> bytes:
    n = int(8000 * seconds)
    return bytes(mulaw_encode_sample(amp * math.sin(2 * math.pi * freq * i / 8000)) for i in range(n))


def frame_rms(samples: list[float], frame: int) -> list[float]:
    out = []
    for i in range(0, len(samples) - frame + 1, frame):
        chunk = samples[i:i + frame]
        out.append(math.sqrt(sum(x * x for x in chunk) / frame))
    return out


def read_wav_mono(path: Path) -> tuple[list[float], int]:
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        rate = w.getframerate()
        raw = w.readframes(w.getnframes())
    n = len(raw) // 2
    vals = memoryview(raw).cast("h")
    return [vals[i] / 32768.0 for i in range(n)], rate


def voiced_seconds(rms: list[float], frame_s: float, threshold: float) -> float:
    return sum(frame_s for r in rms if r > threshold)


# --------------------------------------------------------------------------- fixtures

def start_server(tmp: Path, agent_url: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        DEEPGRAM_API_KEY="test-key",
        DEEPGRAM_AGENT_URL=agent_url,
        PHONE_PAGE="true",
        PHONE_PAGE_TOKEN=TOKEN,
        RECORD_CALLS="false",
        PHARMACY_DB=str(tmp / "pharmacy.db"),
    )
    log = open(tmp / f"server-{port}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), "--host", "127.0.0.1", "--port", str(port), "--config", "config.json"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{(tmp / f'server-{port}.log').read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, port
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not answer /health within 15 s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("phone")


@pytest.fixture(scope="module")
def server(module_tmp):
    """A bridge whose agent URL points nowhere: enough for the access checks."""
    proc, port = start_server(module_tmp, f"ws://127.0.0.1:{free_port()}")
    yield port
    stop_server(proc)


@pytest.fixture(scope="module")
def speech_wav(module_tmp, browser_tools) -> Path:
    """espeak-ng speech, 48 kHz mono 16-bit, with silence either side."""
    raw = module_tmp / "speech-raw.wav"
    out = module_tmp / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), SPEECH], check=True, capture_output=True)
    subprocess.run(
        ["sox", str(raw), "-r", "48000", "-c", "1", "-b", "16", str(out), "pad", "0.6", "1.4"],
        check=True, capture_output=True,
    )
    return out


# --------------------------------------------------------------------------- access checks

def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_phone_page_needs_the_token(server):
    base = f"http://127.0.0.1:{server}"
    assert _http_status(f"{base}/phone") == 403
    assert _http_status(f"{base}/phone?token=") == 403
    assert _http_status(f"{base}/phone?token=wrong") == 403
    assert _http_status(f"{base}/phone?token={TOKEN}x") == 403
    with urllib.request.urlopen(f"{base}/phone?token={TOKEN}", timeout=5) as r:
        assert r.status == 200
        assert r.headers.get_content_type() == "text/html"
        body = r.read().decode()
    assert "Agent softphone" in body and "mulaw-capture" in body


async def test_twilio_socket_with_wrong_token_is_refused(server):
    for token in ("", "wrong", TOKEN + "x", TOKEN[:-1]):
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(f"ws://127.0.0.1:{server}/twilio?token={token}", open_timeout=5):
                pass
        assert info.value.response.status_code == 403


# --------------------------------------------------------------------------- browser helpers

BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]


async def launch(pw, profile: Path, wav: Path | None = None):
    """Debian's Chromium with a fresh profile and a fake microphone playing ``wav``."""
    args = list(BROWSER_ARGS)
    if wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={wav}")
    try:
        return await pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=args,
            viewport={"width": 1280, "height": 800},
        )
    except Exception as e:  # noqa: BLE001 - any launch failure means this machine can't run these
        cannot_run(f"playwright cannot launch {CHROMIUM}: {e}")


async def wait_for(page, expr: str, timeout: float = 10.0, what: str = "") -> None:
    try:
        await page.wait_for_function(expr, timeout=timeout * 1000, polling=50)
    except Exception as e:  # noqa: BLE001 - re-raise with the page's view
        stats = await page.evaluate("JSON.stringify(window.phoneStats)")
        raise AssertionError(f"timed out waiting for {what or expr}; phoneStats={stats}") from e


def sine_fit(x: list[float], freq: float, rate: float) -> tuple[float, float]:
    """Least-squares fit of a*sin + b*cos + c at ``freq``: (amplitude, residual RMS / amplitude)."""
    n = len(x)
    w = 2 * math.pi * freq / rate
    cols = [[math.sin(w * i) for i in range(n)], [math.cos(w * i) for i in range(n)], [1.0] * n]
    ata = [[sum(p * q for p, q in zip(ci, cj)) for cj in cols] for ci in cols]
    aty = [sum(p * y for p, y in zip(ci, x)) for ci in cols]
    # 3x3 solve (Cramer)
    def det(m):
        return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    d = det(ata)
    coef = []
    for k in range(3):
        m = [row[:] for row in ata]
        for r in range(3):
            m[r][k] = aty[r]
        coef.append(det(m) / d)
    fit = [coef[0] * a + coef[1] * b + coef[2] for a, b in zip(cols[0], cols[1])]
    amp = math.hypot(coef[0], coef[1])
    resid = math.sqrt(sum((y - f) ** 2 for y, f in zip(x, fit)) / n)
    return amp, resid / amp


# The page's worklet source plus, for the test only, subclasses that answer a "probe" message.
# A worklet's port delivers in order both ways, so once the reply to a probe arrives, the worklet
# has taken every message posted before it and everything it posted before has arrived here.
PROBED_WORKLETS_JS = """
  const probedSource = document.getElementById("workletSource").textContent + `
    const answeringProbes = (Base) => class extends Base {
      constructor(...args) {
        super(...args);
        const handle = this.port.onmessage;
        this.port.onmessage = (e) => {
          if (e.data.type === "probe") this.port.postMessage({type: "probe"});
          else handle.call(this.port, e);
        };
      }
    };
    registerProcessor("probed-capture", answeringProbes(MulawCapture));
    registerProcessor("probed-playback", answeringProbes(MulawPlayback));`;
  const probedUrl = URL.createObjectURL(new Blob([probedSource], {type: "application/javascript"}));
  // Route a node's messages to onData; the returned function resolves once a probe comes back.
  const probing = (node, onData) => {
    const waiting = [];
    node.port.onmessage = (e) => { if (e.data.type === "probe") waiting.shift()(); else onData(e.data); };
    return () => new Promise((resolve) => { waiting.push(resolve); node.port.postMessage({type: "probe"}); });
  };
"""

CAPTURE_JS = """
async ({rate, freq, amp, seconds, startAt}) => {
""" + PROBED_WORKLETS_JS + """
  const ctx = new OfflineAudioContext(1, Math.round(rate * seconds), rate);
  await ctx.audioWorklet.addModule(probedUrl);
  const osc = new OscillatorNode(ctx, {frequency: freq});
  const gain = new GainNode(ctx, {gain: amp});
  const cap = new AudioWorkletNode(ctx, "probed-capture",
    {numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1]});
  const bytes = [];
  const settled = probing(cap, (data) => { if (data.type === "frame") bytes.push(...new Uint8Array(data.bytes)); });
  osc.connect(gain).connect(cap).connect(ctx.destination);
  osc.start();
  ctx.suspend(startAt).then(async () => { cap.port.postMessage({type: "start"}); await settled(); ctx.resume(); });
  await ctx.startRendering();
  await settled();                        // every frame rendered has arrived
  return bytes;
}
"""

PLAYBACK_JS = """
async ({rate, seconds, plan}) => {
""" + PROBED_WORKLETS_JS + """
  const ctx = new OfflineAudioContext(1, Math.round(rate * seconds), rate);
  await ctx.audioWorklet.addModule(probedUrl);
  const node = new AudioWorkletNode(ctx, "probed-playback",
    {numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1]});
  node.connect(ctx.destination);
  const marks = [];
  let stats = null;
  const settled = probing(node, (data) => { if (data.type === "mark") marks.push(data); else stats = data; });
  const snapshots = [];
  for (const step of plan) {
    ctx.suspend(step.at).then(async () => {
      await settled();                    // whatever the worklet posted so far has arrived
      snapshots.push(marks.map((m) => m.name));
      for (const a of step.actions) {
        if (a.type === "audio") node.port.postMessage({type: "audio", samples: new Float32Array(a.samples)});
        else node.port.postMessage(a);
      }
      await settled();                    // the worklet has taken them before rendering goes on
      ctx.resume();
    });
  }
  const buf = await ctx.startRendering();
  await settled();
  return {out: Array.from(buf.getChannelData(0)), marks, snapshots, stats};
}
"""


def _sine_8k(seconds: float, freq: float, amp: float, chunk: int = 160, phase0: int = 0) -> list[list[float]]:
    n = int(8000 * seconds)
    x = [amp * math.sin(2 * math.pi * freq * (phase0 + i) / 8000) for i in range(n)]
    return [x[i:i + chunk] for i in range(0, n, chunk)]


@pytest.mark.usefixtures("browser_tools")
async def test_audio_worklets_offline(server, tmp_path):
    """The page's own worklet code, rendered offline at 44.1 and 48 kHz.

    Capture must band-limit before going to 8 kHz (a 6 kHz tone must not alias into the
    band at full level, as dropping samples would make it) and produce exactly 8000
    samples a second; playback must be a clean, gap-free sine across 160-sample chunks,
    echo marks when playback reaches them (at once when the queue is empty), and on
    clear go silent at once and echo every pending mark.
    """
    async with async_playwright() as pw:
        context = await launch(pw, tmp_path / "profile")
        page = context.pages[0] if context.pages else await context.new_page()
        await page.goto(f"http://127.0.0.1:{server}/phone?token={TOKEN}")
        for rate in (44100, 48000):
            start_at = 1024 / rate
            # ---- capture
            for freq, amp in ((1000, 0.5), (6000, 0.5)):
                data = await page.evaluate(CAPTURE_JS, {"rate": rate, "freq": freq, "amp": amp,
                                                        "seconds": 1.0, "startAt": start_at})
                expected = (1.0 - start_at) * 8000
                assert abs(len(data) - expected) <= 160 + 8, (rate, len(data), expected)
                assert len(data) % 160 == 0
                x = mulaw_decode(bytes(data))[160:]         # past the filter's start-up
                if freq == 1000:
                    got_amp, resid = sine_fit(x, 1000, 8000)
                    assert abs(got_amp - amp) < 0.02 * amp, (rate, got_amp)
                    assert resid < 0.03, (rate, resid)      # mu-law's own noise is ~ -38 dB
                else:
                    rms = math.sqrt(sum(v * v for v in x) / len(x))
                    assert rms < 0.01 * amp / math.sqrt(2), f"6 kHz aliased in at {rate} Hz: RMS {rms:.4f}"

            # ---- playback
            t_a = start_at
            plan = [
                {"at": t_a, "actions": [{"type": "audio", "samples": c} for c in _sine_8k(0.5, 1000, 0.5)]
                 + [{"type": "mark", "name": "a-end"}]},
                {"at": 0.3, "actions": []},
                {"at": 0.6, "actions": [{"type": "mark", "name": "immediate"}]
                 + [{"type": "audio", "samples": c} for c in _sine_8k(1.0, 1000, 0.5)]
                 + [{"type": "mark", "name": "b-end"}]},
                {"at": 0.8, "actions": [{"type": "clear"}]},
                {"at": 0.9, "actions": []},
            ]
            res = await page.evaluate(PLAYBACK_JS, {"rate": rate, "seconds": 1.2, "plan": plan})
            out = res["out"]
            assert res["snapshots"] == [[], [], ["a-end"], ["a-end", "immediate"], ["a-end", "immediate", "b-end"]]
            nonzero = [i for i, v in enumerate(out) if v != 0.0]
            a_idx = [i for i in nonzero if i < int(0.6 * rate)]
            s_a, e_a = a_idx[0], a_idx[-1]
            assert abs(s_a - t_a * rate) <= 128, (rate, s_a)
            assert abs((e_a - s_a + 1) - 0.5 * rate) <= 3, (rate, e_a - s_a + 1)   # 0.5 s at 8k -> context rate
            amp, resid = sine_fit(out[s_a + 300:e_a - 300], 1000, rate)
            assert abs(amp - 0.5) < 0.005, (rate, amp)
            assert resid < 0.005, f"playback is not a clean sine at {rate} Hz (residual {resid:.4f})"
            b_idx = [i for i in nonzero if i >= int(0.6 * rate)]
            assert b_idx and abs(b_idx[0] - 0.6 * rate) <= 128
            assert abs(b_idx[-1] - 0.8 * rate) <= 128, "clear did not silence playback at once"
            marks = {m["name"]: m["played"] for m in res["marks"]}
            assert abs(marks["a-end"] - 0.5 * rate) <= 2
            assert marks["immediate"] == marks["a-end"]
            assert abs(marks["b-end"] - (0.5 * rate + len(b_idx))) <= 2
            assert res["stats"]["queued"] == 0
        await context.close()


# --------------------------------------------------------------------------- the call

@pytest.mark.usefixtures("browser_tools")
async def test_browser_call(module_tmp, speech_wav, tmp_path):
    """A whole call from the browser through the real bridge to a fake agent."""
    wav_samples, wav_rate = read_wav_mono(speech_wav)
    loop_seconds = len(wav_samples) / wav_rate
    wav_rms = frame_rms(wav_samples, wav_rate // 50)
    wav_peak = max(wav_rms)

    async with FakeAgent() as agent:
        proc, port = start_server(module_tmp, agent.url)
        sent_frames: list[str] = []
        sockets: list = []
        try:
            async with async_playwright() as pw:
                context = await launch(pw, tmp_path / "profile", speech_wav)
                page = context.pages[0] if context.pages else await context.new_page()
                console: list[str] = []
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                requests: list[str] = []
                page.on("request", lambda r: requests.append(r.url))
                closed_sockets: list = []

                def on_ws(ws):
                    if "/twilio" in ws.url:
                        sockets.append(ws)
                        ws.on("framesent", lambda payload: sent_frames.append(payload))
                        ws.on("close", lambda w: closed_sockets.append(w))
                page.on("websocket", on_ws)

                await page.goto(f"http://127.0.0.1:{port}/phone?token={TOKEN}")
                assert await page.evaluate("window.phoneStats.state") == "idle"
                await page.click("#callBtn")
                session = await agent.session(0, timeout=10)
                await eventually(lambda: session.settings is not None, 10, "Settings at the agent")
                await wait_for(page, "window.phoneStats.state === 'in-call'", what="in-call")
                assert await page.evaluate("window.phoneStats.micActive")

                # ---- caller -> agent: two loops of the fake microphone's file
                need = int(8000 * loop_seconds * 2)
                await eventually(lambda: len(session.audio) >= need, loop_seconds * 2 + 8, "two loops of caller audio")
                heard = mulaw_decode(bytes(session.audio[:need]))
                rms = frame_rms(heard, 160)
                heard_peak = max(rms)
                assert heard_peak > 0.05, f"speech never got loud at the agent (peak frame RMS {heard_peak:.4f})"
                quiet = sorted(rms)[: len(rms) // 5]               # the padding either side of the speech
                assert max(quiet) < 0.01, f"silence is not silent ({max(quiet):.4f})"
                # AGC and noise suppression change levels, so the threshold is relative to each peak.
                wav_voiced = voiced_seconds(wav_rms, 0.02, 0.1 * wav_peak)
                heard_voiced = voiced_seconds(rms, 0.02, 0.1 * heard_peak) / 2
                voiced = [r for r in rms if r > 0.1 * heard_peak]
                voiced_rms = math.sqrt(sum(r * r for r in voiced) / len(voiced))
                print(f"\nspeech at the agent: voiced {heard_voiced:.2f} s a loop (file {wav_voiced:.2f} s), "
                      f"voiced RMS {voiced_rms:.3f}, peak {heard_peak:.3f} (file {wav_peak:.3f}), "
                      f"silence <= {max(quiet):.4f}")
                assert wav_voiced > 1.0
                assert abs(heard_voiced - wav_voiced) < 0.3 * wav_voiced, (heard_voiced, wav_voiced)
                assert voiced_rms > 0.03 and voiced_rms > 10 * max(quiet)

                # ---- what the page sent is Twilio's wire format
                events = [json.loads(f) for f in sent_frames]
                assert events[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
                start = events[1]
                assert start["event"] == "start" and start["sequenceNumber"] == "1"
                sid = start["streamSid"]
                assert re.fullmatch(r"MZ[0-9a-f]{32}", sid)
                assert start["start"]["streamSid"] == sid
                assert re.fullmatch(r"CA[0-9a-f]{32}", start["start"]["callSid"])
                assert re.fullmatch(r"AC[0-9a-f]{32}", start["start"]["accountSid"])
                assert start["start"]["tracks"] == ["inbound"]
                assert start["start"]["customParameters"] == {"source": "browser"}
                assert start["start"]["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
                media = [e for e in events if e["event"] == "media"]
                for i, e in enumerate(media):
                    assert set(e) == {"event", "sequenceNumber", "streamSid", "media"}
                    assert e["streamSid"] == sid
                    assert e["sequenceNumber"] == str(i + 2)
                    assert e["media"]["track"] == "inbound"
                    assert e["media"]["chunk"] == str(i + 1)
                    assert e["media"]["timestamp"] == str(i * 20)
                    assert len(base64.b64decode(e["media"]["payload"])) == 160

                rate = await page.evaluate("window.phoneStats.sampleRate")
                assert rate in (8000, 16000, 22050, 24000, 32000, 44100, 48000, 96000)

                # ---- agent -> caller: a tone is played, sample for sample at the context rate,
                # and the bridge's end-of-turn mark is echoed when it has played
                tone = tone_mulaw(1.0)
                for i in range(0, len(tone), 800):
                    await session.send_audio(tone[i:i + 800])
                await session.send_json({"type": "AgentAudioDone"})
                expected = len(tone) * rate / 8000
                await wait_for(page, f"window.phoneStats.samplesPlayed >= {expected * 0.97}", 8, "tone played")
                await wait_for(page, "window.phoneStats.samplesQueued === 0 && window.phoneStats.marksEchoed >= 1",
                               3, "tone drained and its mark echoed")
                stats = await page.evaluate("window.phoneStats")
                assert abs(stats["samplesPlayed"] - expected) <= 0.02 * expected, (stats["samplesPlayed"], expected)
                assert stats["bytesReceived"] == len(tone)
                assert stats["markLog"][0]["name"] == "agent-turn-1"
                assert stats["markLog"][0]["played"] >= expected - 2, "mark echoed before its audio had played"
                echo = next(json.loads(f) for f in sent_frames if '"mark"' in f)
                assert echo["event"] == "mark" and echo["streamSid"] == sid and echo["mark"] == {"name": "agent-turn-1"}

                # ---- transcript, latency, function call
                await session.send_json({"type": "ConversationText", "role": "user", "content": SPEECH})
                await session.send_json({"type": "AgentStartedSpeaking", "total_latency": 1.25,
                                         "tts_latency": 0.31, "ttt_latency": 0.94})
                await session.send_json({"type": "ConversationText", "role": "assistant",
                                         "content": "Let me look up ibuprofen for you."})
                await session.send_json({
                    "type": "FunctionCallRequest",
                    "functions": [{"id": "fc-1", "name": "get_drug_info",
                                   "arguments": json.dumps({"drug_name": "ibuprofen"}), "client_side": True}],
                })
                response = (await eventually(lambda: session.of_type("FunctionCallResponse"), 10,
                                             "FunctionCallResponse"))[0]
                assert response["id"] == "fc-1" and response["name"] == "get_drug_info"
                assert "fever reducer" in json.loads(response["content"])["description"]
                await wait_for(page, "window.phoneStats.functionCalls.length >= 1", 5, "function call on the page")
                transcript = await page.locator("#transcript").inner_text()
                assert SPEECH in transcript and "Let me look up ibuprofen for you." in transcript
                functions = await page.locator("#functions").inner_text()
                assert "get_drug_info" in functions and '"drug_name": "ibuprofen"' in functions
                assert "fever reducer" in functions and "8.99" in functions
                assert "1.25 s" in await page.locator("#latencyTable").inner_text()
                await session.send_json({"type": "LatencyReport", "stt_latency": 0.21, "ttt_token_latency": 0.47,
                                         "tts_latency": 0.18, "total_latency": 0.93})
                await wait_for(page, "window.phoneStats.latencyReports.length >= 1", 5, "latency report on the page")
                report_row = await page.locator("#reportBody tr").first.inner_text()
                assert all(figure in report_row for figure in ("0.21 s", "0.47 s", "0.18 s", "0.93 s")), report_row
                # ---- the keypad sends Twilio's dtmf events; the bridge passes the keys to the agent
                await page.click('#keypad button[data-key="1"]')
                await page.click('#keypad button[data-key="#"]')
                injected = await eventually(lambda: session.of_type("InjectUserMessage"), 5, "the keys at the agent")
                assert injected == [{"type": "InjectUserMessage", "content": "The caller pressed 1"}]
                keys = [json.loads(f) for f in sent_frames if '"dtmf"' in f]
                assert [(set(k), k["streamSid"], k["dtmf"]) for k in keys] == [
                    ({"event", "streamSid", "sequenceNumber", "dtmf"}, sid, {"track": "inbound_track", "digit": digit})
                    for digit in "1#"]
                assert await page.evaluate("window.phoneStats.keysSent") == 2
                stats = await page.evaluate("window.phoneStats")
                assert [(t["role"], t["content"]) for t in stats["transcript"]] == [
                    ("user", SPEECH), ("assistant", "Let me look up ibuprofen for you.")]
                assert stats["functionCalls"][0]["name"] == "get_drug_info"
                assert stats["functionCalls"][0]["result"]["name"] == "Ibuprofen"

                # ---- barge-in: a long reply is queued; UserStartedSpeaking clears it at once
                long_reply = tone_mulaw(6.0, freq=330.0)
                for i in range(0, len(long_reply), 1600):
                    await session.send_audio(long_reply[i:i + 1600])
                await session.send_json({"type": "AgentAudioDone"})
                await wait_for(page, f"window.phoneStats.samplesQueued > {rate * 3}", 5, "long reply queued")
                await asyncio.sleep(0.2)                           # the panel's counters catch up
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "phone-mid-call.png"))
                played_before = await page.evaluate("window.phoneStats.samplesPlayed")
                assert await page.evaluate("window.phoneStats.marksEchoed") == 1, "mark echoed before its audio"
                await session.send_json({"type": "UserStartedSpeaking"})
                await wait_for(page, "window.phoneStats.clears >= 1 && window.phoneStats.samplesQueued === 0",
                               3, "clear")
                await wait_for(page, "window.phoneStats.marksEchoed >= 2", 2, "pending mark echoed on clear")
                await asyncio.sleep(0.3)
                stats = await page.evaluate("window.phoneStats")
                assert stats["samplesQueued"] == 0
                assert stats["samplesPlayed"] - played_before < rate, "the reply kept playing after clear"
                assert stats["markLog"][1]["name"] == "agent-turn-2"
                assert stats["markLog"][1]["played"] - played_before < rate
                assert stats["marksEchoed"] == stats["marksReceived"] == 2
                assert stats["protocolErrors"] == 0

                # ---- hang up: stop, then both sockets close
                await page.click("#callBtn")
                await eventually(lambda: closed_sockets, 5, "the page's WebSocket to close")
                await asyncio.wait_for(session.closed.wait(), 5)
                stop = json.loads(sent_frames[-1])
                assert stop["event"] == "stop" and stop["streamSid"] == sid
                assert stop["stop"] == {"accountSid": start["start"]["accountSid"], "callSid": start["start"]["callSid"]}
                assert int(stop["sequenceNumber"]) == len(sent_frames) - 1
                stats = await page.evaluate("window.phoneStats")
                assert stats["state"] == "ended" and not stats["micActive"]

                # ---- a second call, ended from the far side: the page shows it and lets the mic go
                await page.click("#callBtn")
                second = await agent.session(1, timeout=10)
                await wait_for(page, "window.phoneStats.state === 'in-call' && window.phoneStats.framesSent > 10",
                               10, "second call")
                assert await page.evaluate("window.phoneStats.micActive")
                await second.close(1000, "bye")
                await wait_for(page, "window.phoneStats.state === 'ended'", 5, "the call to end from the bridge")
                stats = await page.evaluate("window.phoneStats")
                assert not stats["micActive"]
                assert "closed the call" in await page.locator("#statusLine").inner_text()
                assert await page.locator("#callBtn").inner_text() == "Call"

                assert not [c for c in console if c.startswith(("error", "pageerror"))], console
                # Self-contained: the page and its WebSocket, nothing else (data:/blob: are local).
                others = [u for u in requests if not u.startswith(("data:", "blob:"))
                          and not re.match(rf"(http|ws)://127\.0\.0\.1:{port}/(phone|twilio)\?token=", u)]
                assert not others, others
                await context.close()
        finally:
            stop_server(proc)


# --------------------------------------------------------------------------- layout

# What the page looks like, measured: returns the problems found (empty when the layout is right)
# and what was looked at, so a check that found nothing to look at fails too.
LAYOUT_PROBLEMS_JS = """
() => {
  const problems = [];
  const slack = 0.5;                                   // sub-pixel rounding
  const rect = (el) => el.getBoundingClientRect();
  const fmt = (r) => `[${Math.round(r.left)},${Math.round(r.top)} ${Math.round(r.width)}x${Math.round(r.height)}]`;
  const label = (el) => (el.id ? "#" + el.id : el.tagName.toLowerCase() + [...el.classList].map((c) => "." + c).join(""))
    + (el.children.length ? "" : ` "${el.textContent.trim().slice(0, 40)}"`);
  const shown = (el) => el.getClientRects().length > 0 && getComputedStyle(el).visibility !== "hidden";
  const overlap = (a, b) => a.left < b.right - slack && b.left < a.right - slack
    && a.top < b.bottom - slack && b.top < a.bottom - slack;
  const inside = (a, b) => a.left >= b.left - slack && a.right <= b.right + slack
    && a.top >= b.top - slack && a.bottom <= b.bottom + slack;
  const scrolls = (el, axis) => ["auto", "scroll"].includes(getComputedStyle(el)["overflow" + axis]);
  const checked = {sections: 0, rows: 0, texts: 0, scrolling: []};

  // 1. The header and the cards don't overlap; inside each, its blocks (headings, scroll boxes,
  //    controls) lie inside it and don't overlap each other.
  const sections = [document.querySelector("header"), ...document.querySelectorAll("section.card")].filter(shown);
  checked.sections = sections.length;
  sections.forEach((a, i) => sections.slice(i + 1).forEach((b) => {
    if (overlap(rect(a), rect(b))) problems.push(`${label(a)} ${fmt(rect(a))} overlaps ${label(b)} ${fmt(rect(b))}`);
  }));
  for (const section of sections) {
    const blocks = [...section.children].filter(shown);
    blocks.forEach((a, i) => {
      if (!inside(rect(a), rect(section)))
        problems.push(`${label(a)} ${fmt(rect(a))} sticks out of ${label(section)} ${fmt(rect(section))}`);
      blocks.slice(i + 1).forEach((b) => {
        if (overlap(rect(a), rect(b)))
          problems.push(`${label(a)} ${fmt(rect(a))} overlaps ${label(b)} ${fmt(rect(b))} in ${label(section)}`);
      });
    });
  }

  // 2. Table rows lie inside the box that shows them and inside their card. Where that box has
  //    more rows than it can show, it scrolls: then the column names and the newest row must be
  //    in it (the rest are a scroll away).
  for (const table of document.querySelectorAll("table")) {
    if (!shown(table)) continue;
    const card = table.closest("section");
    const box = table.closest(".scroll") || card;
    let rows = [...table.rows];
    if (box.scrollHeight > box.clientHeight + 1) {
      checked.scrolling.push(box.id);
      rows = [...table.tHead.rows[0].cells, table.tBodies[0].rows[table.tBodies[0].rows.length - 1]];
    }
    for (const row of rows) {
      checked.rows += 1;
      for (const container of new Set([box, card])) {
        if (!inside(rect(row), rect(container)))
          problems.push(`row "${row.innerText.replace(/\\s+/g, " ")}" ${fmt(rect(row))} is not inside ${label(container)} ${fmt(rect(container))}`);
      }
    }
  }

  // 3. No text is cut: every element holding text shows all of it, inside its section. Boxes
  //    meant to scroll (function results, the scroll boxes) may hold more than they show.
  for (const el of document.querySelectorAll("body *")) {
    if (!shown(el) || el.closest("script")) continue;
    if (![...el.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim())) continue;
    checked.texts += 1;
    const style = getComputedStyle(el);
    let box = el;
    if (style.display === "inline") {                 // an inline box has no scroll size of its own
      while (getComputedStyle(box).display === "inline") box = box.parentElement;
      if (!inside(rect(el), rect(box)))
        problems.push(`${label(el)} ${fmt(rect(el))} runs out of ${label(box)} ${fmt(rect(box))}`);
    }
    if (box.scrollWidth > box.clientWidth + 1 && !scrolls(box, "X"))
      problems.push(`${label(box)} is cut: ${box.scrollWidth} px of text in ${box.clientWidth} px`);
    if (box.scrollHeight > box.clientHeight + 1 && !scrolls(box, "Y"))
      problems.push(`${label(box)} is cut: ${box.scrollHeight} px high in ${box.clientHeight} px`);
    if (style.textOverflow === "ellipsis") problems.push(`${label(el)} may be cut with an ellipsis`);
    const section = el.closest("header, section");
    if (section && (rect(el).left < rect(section).left - slack || rect(el).right > rect(section).right + slack))
      problems.push(`${label(el)} ${fmt(rect(el))} runs out of ${label(section)} ${fmt(rect(section))}`);
  }

  // 4. The status line is whole, in the header, on the screen.
  const status = document.getElementById("statusLine"), header = document.querySelector("header");
  if (!inside(rect(status), rect(header)) || rect(status).right > window.innerWidth + slack)
    problems.push(`the status line ${fmt(rect(status))} is not inside the header ${fmt(rect(header))} on a ${window.innerWidth} px screen`);

  // 5. A wide screen shows the whole page in one window: every card ends inside it; the latency
  //    tables take at most 60% of their column, and the function calls (what a developer trying
  //    their functions reads) the rest, never under 150 px.
  if (window.matchMedia("(min-width: 981px) and (min-height: 560px)").matches) {
    for (const section of sections) {
      if (rect(section).bottom > window.innerHeight + slack)
        problems.push(`${label(section)} ${fmt(rect(section))} ends below the ${window.innerHeight} px window`);
    }
    const functions = document.querySelector(".fn-card"), latency = document.querySelector(".lat-card");
    const column = rect(functions.parentElement);
    if (rect(functions).height < 150 - slack)
      problems.push(`${label(functions)} ${fmt(rect(functions))} is under its 150 px`);
    if (rect(latency).height > 0.6 * column.height + slack)
      problems.push(`${label(latency)} ${fmt(rect(latency))} takes over 60% of its ${Math.round(column.height)} px column`);
  }
  return {problems, checked};
}
"""

VIEWPORTS = ((1280, 800), (390, 844))


async def layout_problems(page, moment: str) -> tuple[list[str], list[str]]:
    """The layout's problems at each viewport size, and which boxes had to scroll; screenshots too."""
    problems, scrolling = [], []
    for width, height in VIEWPORTS:
        await page.set_viewport_size({"width": width, "height": height})
        await page.evaluate("window.scrollTo(0, 0)")
        await page.screenshot(path=str(ARTIFACTS / f"phone-layout-{moment}-{width}x{height}.png"), full_page=True)
        found = await page.evaluate(LAYOUT_PROBLEMS_JS)
        assert found["checked"]["sections"] >= 4 and found["checked"]["texts"] > 40, found["checked"]
        problems += [f"{width}x{height}: {problem}" for problem in found["problems"]]
        scrolling += [f"{width}x{height} {box}" for box in found["checked"]["scrolling"]]
    return problems, scrolling


async def agent_turn(session, turn: int) -> None:
    """One turn as Deepgram sends it: transcript, latency, a function call the bridge answers, a report."""
    await session.send_json({"type": "ConversationText", "role": "user",
                             "content": f"How much is ibuprofen? This is turn {turn}."})
    await session.send_json({"type": "AgentStartedSpeaking", "total_latency": 1.25 + 9 * (turn == 3),
                             "tts_latency": 0.31, "ttt_latency": 0.94})
    await session.send_json({"type": "ConversationText", "role": "assistant", "content": "Let me look that up."})
    await session.send_json({"type": "FunctionCallRequest", "functions": [
        {"id": f"fc-{turn}", "name": "get_drug_info", "arguments": json.dumps({"drug_name": "ibuprofen"}),
         "client_side": True}]})
    await eventually(lambda: len(session.of_type("FunctionCallResponse")) >= turn, 10, f"turn {turn}'s answer")
    # Wide figures (10 s and more) in every column: the narrow screen must still fit them.
    await session.send_json({"type": "LatencyReport", "stt_latency": 10.21, "ttt_token_latency": 10.47,
                             "ttt_tool_latency": 10.12, "tts_latency": 10.18, "total_latency": 41.93})


@pytest.mark.usefixtures("browser_tools")
async def test_layout_holds_after_many_turns(module_tmp, tmp_path):
    """At 1280x800 and 390x844 nothing overlaps, no text is cut and the status is whole.

    Measured on the page's element boxes, after several turns with function calls (every table
    row visible without scrolling), after many (the tables scroll, keeping their newest row and
    column names in view), and once the far side has ended the call (the longest status line).
    """
    ARTIFACTS.mkdir(exist_ok=True)
    async with FakeAgent() as agent:
        proc, port = start_server(module_tmp, agent.url)
        try:
            async with async_playwright() as pw:
                context = await launch(pw, tmp_path / "profile")
                page = context.pages[0] if context.pages else await context.new_page()
                await page.goto(f"http://127.0.0.1:{port}/phone?token={TOKEN}")
                await page.click("#callBtn")
                session = await agent.ready_session(0)
                await wait_for(page, "window.phoneStats.state === 'in-call'", what="in-call")

                for turns in (4, 12):
                    for turn in range(len(session.of_type("FunctionCallResponse")) + 1, turns + 1):
                        await agent_turn(session, turn)
                    await wait_for(page, f"window.phoneStats.latencyReports.length === {turns} && "
                                         f"window.phoneStats.functionCalls.length === {turns}", 5, f"{turns} turns")
                    assert await page.locator("#latencyBody tr").count() == turns
                    assert await page.locator("#reportBody tr").count() == turns
                    problems, scrolling = await layout_problems(page, f"{turns}-turns")
                    assert not problems, "\n".join(problems)
                    if turns == 4:
                        assert not [box for box in scrolling if "latency" in box or "report" in box], scrolling

                await session.close(1000, "bye")
                await wait_for(page, "window.phoneStats.state === 'ended'", 5, "the call to end from the far side")
                status = await page.locator("#statusLine").inner_text()
                assert status.startswith("The bridge closed the call"), status
                problems, _ = await layout_problems(page, "ended")
                assert not problems, "\n".join(problems)
                await context.close()
        finally:
            stop_server(proc)
