// thinktalk browser demo: microphone -> /v1/realtime (GA protocol) -> streamed text + speech. Plain JS, no build.
// Hands-free (the default): the microphone stays open, the server's VAD ends each turn and starts the answer;
// speaking over an answer interrupts it (playback stops, the answer is truncated to what was heard).
// Push-to-talk: untick "hands-free", record, click again to send.
"use strict";

const RATE = 24000; // pcm16 in and out, as OpenAI's realtime API
const $ = (id) => document.getElementById(id);
const stats = (window.thinktalkStats = {
  connected: false, session: null, sentChunks: 0, recordedSeconds: 0, responses: 0, cancelled: 0,
  audioChunks: 0, audioBytes: 0, transcript: "", errors: [], speechStarted: 0, speechStopped: 0,
  latencies: [], truncated: 0,
});

let ws = null;
let reconnectDelay = 500;
let current = null; // the response being received: {id, el, text}
let attachments = []; // {kind: "image"|"video", url, name}
let recording = null; // {ctx, stream, node, source, resampler}
let playCtx = null;
let playAt = 0;
let playing = [];
let speechStartMs = 0; // audio_start_ms of the speech in progress
let speechStoppedAt = null; // performance.now() of the last speech_stopped (hands-free latency)
let heard = null; // the answer being played: {itemId, start (playCtx time of its first sample), seconds}
function handsFree() { return $("handsfree").checked; }

// -- helpers -------------------------------------------------------------------------------------------
function apiKey() { return $("apikey").value.trim(); }
function authHeaders() { return apiKey() ? { Authorization: "Bearer " + apiKey() } : {}; }
function setStatus(state, text) { const s = $("status"); s.dataset.state = state; s.textContent = text || state; }

function addMessage(role, text, extra) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  if (extra) for (const node of extra) el.appendChild(node);
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text || "";
  el.appendChild(body);
  $("log").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function showError(message) {
  stats.errors.push(message);
  addMessage("error", message);
  setStatus("error", "error");
  setTimeout(() => { if ($("status").dataset.state === "error") setStatus("idle"); }, 3000);
}

function base64FromBytes(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function bytesFromBase64(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function floatToPcm16(x) {
  const out = new Int16Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = Math.max(-1, Math.min(1, x[i])) * 0x7fff;
  return out;
}

// Linear-interpolation resampler that carries its phase across blocks (speech-grade, not hi-fi).
class Resampler {
  constructor(from, to) { this.step = from / to; this.pos = 0; this.last = 0; }
  push(x) {
    const y = new Float32Array(x.length + 1);
    y[0] = this.last; y.set(x, 1);
    const out = [];
    let p = this.pos;
    while (p < y.length - 1) { const i = Math.floor(p); out.push(y[i] + (y[i + 1] - y[i]) * (p - i)); p += this.step; }
    this.pos = p - (y.length - 1);
    this.last = y[y.length - 1];
    return Float32Array.from(out);
  }
}

// -- model list and voices -------------------------------------------------------------------------------
async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: authHeaders() });
    const body = await r.json();
    if (!r.ok) { showError(body.error ? body.error.message : "could not list models"); return; }
    const m = body.data[0];
    $("model").textContent = m.id + " (" + m.family + ")";
    const sel = $("voice");
    sel.innerHTML = "";
    for (const v of m.voices) { const o = document.createElement("option"); o.value = v; o.textContent = v; sel.appendChild(o); }
    if (m.default_voice) sel.value = m.default_voice;
    sel.disabled = m.voices.length === 0;
    if (m.voices.length === 0) { const o = document.createElement("option"); o.textContent = "text only"; sel.appendChild(o); }
  } catch (e) { showError("could not reach the server: " + e); }
}

// -- the realtime connection --------------------------------------------------------------------------------
function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const protocols = ["realtime"];
  if (apiKey()) protocols.push("openai-insecure-api-key." + apiKey());
  ws = new WebSocket(proto + "//" + location.host + "/v1/realtime", protocols);
  ws.onopen = () => { stats.connected = true; reconnectDelay = 500; setStatus("idle", "connected"); updateSession(); };
  ws.onclose = (e) => {
    stats.connected = false;
    setStatus("idle", "disconnected");
    if (e.code === 1008) { showError("the server refused the API key"); return; }
    setTimeout(connect, reconnectDelay);
    reconnectDelay = Math.min(reconnectDelay * 2, 8000);
  };
  ws.onmessage = (m) => handle(JSON.parse(m.data));
}

function send(event) {
  if (!ws || ws.readyState !== WebSocket.OPEN) { showError("not connected"); return false; }
  ws.send(JSON.stringify(event));
  return true;
}

function updateSession() {
  const voice = $("voice").disabled ? null : $("voice").value;
  const turn = handsFree()
    ? { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500,
        create_response: true, interrupt_response: true }
    : null;
  const session = { type: "realtime", output_modalities: voice ? ["audio"] : ["text"],
                    audio: { input: { format: { type: "audio/pcm", rate: RATE }, turn_detection: turn } } };
  if (voice) session.audio.output = { format: { type: "audio/pcm", rate: RATE }, voice };
  send({ type: "session.update", session });
}

function handle(ev) {
  switch (ev.type) {
    case "session.created":
    case "session.updated":
      stats.session = ev.session;
      break;
    case "input_audio_buffer.speech_started":
      stats.speechStarted += 1;
      speechStartMs = ev.audio_start_ms;
      interruptPlayback(); // barge-in: stop what is playing, keep only what was heard
      if (recording) setStatus("recording", "listening…");
      break;
    case "input_audio_buffer.speech_stopped":
      stats.speechStopped += 1;
      speechStoppedAt = performance.now();
      addMessage("user", "(spoken, " + ((ev.audio_end_ms - speechStartMs) / 1000).toFixed(1) + " s)");
      setStatus("answering", "thinking…");
      break;
    case "output_audio_buffer.cleared":
      stopPlayback();
      break;
    case "response.created":
      current = { id: ev.response.id, text: "", el: addMessage("assistant", ""), latency: null,
                  stoppedAt: speechStoppedAt };
      speechStoppedAt = null;
      setStatus("answering", "answering…");
      $("stop").disabled = false;
      break;
    case "response.output_text.delta":
    case "response.output_audio_transcript.delta":
    case "response.text.delta":
    case "response.audio_transcript.delta":
      stats.transcript += ev.delta;
      if (current) { current.text += ev.delta; current.el.querySelector(".body").textContent = current.text; }
      break;
    case "response.output_audio.delta":
    case "response.audio.delta":
      stats.audioChunks += 1;
      if (current && current.latency === null && current.stoppedAt !== null) {
        current.latency = performance.now() - current.stoppedAt;
        stats.latencies.push(current.latency);
      }
      play(bytesFromBase64(ev.delta), ev.item_id);
      break;
    case "response.done": {
      stats.responses += 1;
      const r = ev.response;
      if (current) {
        if (r.status === "cancelled") { stats.cancelled += 1; current.el.classList.add("cancelled"); }
        const meta = document.createElement("div");
        meta.className = "meta";
        const u = r.usage || {};
        const label = { completed: "done", incomplete: "stopped at the token limit", cancelled: "stopped",
                        failed: "failed" }[r.status] || r.status;
        meta.textContent = label + (u.output_tokens !== undefined ? " · " + u.output_tokens + " tokens" : "") +
          (current.latency !== null ? " · end of speech → first audio " + Math.round(current.latency) + " ms" : "");
        current.el.appendChild(meta);
      }
      current = null;
      $("stop").disabled = true;
      setStatus(recording ? "recording" : "idle", recording ? "listening…" : "ready");
      break;
    }
    case "error":
      showError(ev.error.message);
      break;
  }
}

// -- playback -------------------------------------------------------------------------------------------------
function ensurePlayback() {
  if (!playCtx) playCtx = new AudioContext();
  if (playCtx.state === "suspended") playCtx.resume();
}

function play(bytes, itemId) {
  stats.audioBytes += bytes.length;
  ensurePlayback();
  const pcm = new Int16Array(bytes.buffer, bytes.byteOffset, Math.floor(bytes.length / 2));
  if (pcm.length === 0) return;
  const buf = playCtx.createBuffer(1, pcm.length, RATE);
  const ch = buf.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = playCtx.createBufferSource();
  src.buffer = buf;
  src.connect(playCtx.destination);
  playAt = Math.max(playAt, playCtx.currentTime + 0.05);
  if (itemId && (!heard || heard.itemId !== itemId)) heard = { itemId, start: playAt, seconds: 0 };
  if (heard) heard.seconds += buf.duration;
  src.start(playAt);
  playAt += buf.duration;
  playing.push(src);
  src.onended = () => { playing = playing.filter((s) => s !== src); };
}

// The user spoke over the answer: stop it here, and tell the server how much of it was heard.
function interruptPlayback() {
  if (heard && playCtx) {
    const ms = Math.round(1000 * Math.min(heard.seconds, Math.max(0, playCtx.currentTime - heard.start)));
    if (ms < Math.round(1000 * heard.seconds)) {
      send({ type: "conversation.item.truncate", item_id: heard.itemId, content_index: 0, audio_end_ms: ms });
      stats.truncated += 1;
    }
  }
  heard = null;
  stopPlayback();
}

function stopPlayback() {
  for (const s of playing) { try { s.stop(); } catch (e) { /* already stopped */ } }
  playing = [];
  playAt = 0;
}

function stopAnswer() {
  stopPlayback();
  if (current) send({ type: "response.cancel" });
}

// -- recording ------------------------------------------------------------------------------------------------
async function startRecording() {
  if (!ws || ws.readyState !== WebSocket.OPEN) { showError("not connected"); return; }
  ensurePlayback();
  if (!handsFree()) stopAnswer(); // push-to-talk barge-in: recording interrupts the answer
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
  } catch (e) { showError("microphone unavailable: " + e.message); return; }
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("/static/recorder-worklet.js");
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "thinktalk-recorder");
  const resampler = new Resampler(ctx.sampleRate, RATE);
  send({ type: "input_audio_buffer.clear" });
  node.port.onmessage = (m) => {
    const pcm = floatToPcm16(resampler.push(m.data));
    if (!pcm.length) return;
    stats.recordedSeconds += pcm.length / RATE;
    stats.sentChunks += 1;
    send({ type: "input_audio_buffer.append", audio: base64FromBytes(new Uint8Array(pcm.buffer)) });
  };
  source.connect(node);
  recording = { ctx, stream, node, source, started: performance.now() };
  $("record").classList.add("on");
  $("record").textContent = handsFree() ? "■ Stop listening" : "■ Stop and send";
  setStatus("recording", handsFree() ? "listening…" : "recording…");
}

function stopRecording() {
  const r = recording;
  recording = null;
  $("record").classList.remove("on");
  $("record").textContent = "● Record";
  r.source.disconnect();
  r.node.port.onmessage = null;
  r.stream.getTracks().forEach((t) => t.stop());
  r.ctx.close();
  if (handsFree()) { send({ type: "input_audio_buffer.clear" }); setStatus("idle", "ready"); return; }
  const seconds = (performance.now() - r.started) / 1000;
  if (seconds < 0.2) { send({ type: "input_audio_buffer.clear" }); setStatus("idle", "too short"); return; }
  const extra = attachmentNodes();
  if (attachments.length) send({ type: "conversation.item.create", item: userItem([]) });
  addMessage("user", "(spoken, " + seconds.toFixed(1) + " s)", extra);
  clearAttachments();
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
  setStatus("answering", "thinking…");
}

// -- text and attachments ------------------------------------------------------------------------------------
function userItem(content) {
  for (const a of attachments) {
    content.push(a.kind === "image" ? { type: "input_image", image_url: a.url } : { type: "input_video", video_url: a.url });
  }
  return { type: "message", role: "user", content };
}

function attachmentNodes() {
  return attachments.map((a) => {
    const el = document.createElement(a.kind === "image" ? "img" : "video");
    el.src = a.url;
    if (a.kind === "video") el.controls = true;
    return el;
  });
}

function renderAttachments() {
  const box = $("attachments");
  box.innerHTML = "";
  attachments.forEach((a, i) => {
    const chip = document.createElement("div");
    chip.className = "chip";
    chip.appendChild(attachmentNodes()[i]);
    const x = document.createElement("button");
    x.textContent = "×";
    x.title = "remove";
    x.onclick = () => { attachments.splice(i, 1); renderAttachments(); };
    chip.appendChild(x);
    box.appendChild(chip);
  });
}

function clearAttachments() { attachments = []; renderAttachments(); }

$("file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  e.target.value = "";
  if (!file) return;
  const kind = file.type.startsWith("video/") ? "video" : "image";
  const reader = new FileReader();
  reader.onload = () => { attachments.push({ kind, url: reader.result, name: file.name }); renderAttachments(); };
  reader.readAsDataURL(file);
});

$("textform").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text && !attachments.length) return;
  ensurePlayback();
  stopAnswer();
  const extra = attachmentNodes();
  const content = text ? [{ type: "input_text", text }] : [];
  if (!send({ type: "conversation.item.create", item: userItem(content) })) return;
  addMessage("user", text, extra);
  clearAttachments();
  $("text").value = "";
  send({ type: "response.create" });
  setStatus("answering", "thinking…");
});

$("record").addEventListener("click", () => (recording ? stopRecording() : startRecording()));
$("stop").addEventListener("click", stopAnswer);
$("voice").addEventListener("change", updateSession);
$("handsfree").addEventListener("change", () => {
  if (recording) stopRecording();
  $("record").textContent = handsFree() ? "● Start talking" : "● Record";
  updateSession();
});
$("apikey").addEventListener("change", () => {
  localStorage.setItem("thinktalk-api-key", apiKey());
  loadModels();
  if (ws) ws.close();
});

$("apikey").value = localStorage.getItem("thinktalk-api-key") || "";
loadModels().then(connect);
