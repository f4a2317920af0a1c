// The page: one state at a time, each explained in plain words with what to do next.
//
//   checking -> ready | loading | failed | unreachable | insecure | nomicapi
//   Start: connecting -> waiting (socket open, no handshake yet) -> talking
//          | micDenied | noMic | micBusy | busy (auto retry) | loading | noAnswer | badParameter
//   talking -> stopped (Stop) | sessionLimit | idleTimeout | reconnecting (-> waiting | gaveUp) | error

import { AudioIO, MicError } from "./audio.js";
import { applyLanguage, language, LANGUAGES, pickLanguage, t } from "./i18n.js";
import { audioMessage, chatUrl, decodeJson, decodeText, httpUrl, KIND, parseMessage } from "./protocol.js";
import { SettingsForm } from "./settings-form.js";
import { estimateLatencyMs, FRAME_MS, StatsView } from "./stats.js";
import { Transcript } from "./transcript.js";
import { ScreenWakeLock } from "./wakelock.js";

const $ = (id) => document.getElementById(id);

const OPEN_TIMEOUT_MS = 10_000;
const HANDSHAKE_TIMEOUT_MS = 60_000; // a GPU server may re-capture CUDA graphs for new settings
const BUSY_RETRY_S = 10;
const RECONNECT_DELAYS_S = [1, 2, 3, 5, 8, 10, 10, 10, 10, 10]; // about a minute, then give up
const READY_POLL_MS = 2000;
const STATUS_POLL_MS = 1000;
const STATS_RENDER_MS = 250;
const SLOW_AFTER = 3; // stats messages in a row that must agree before the slow-GPU warning changes
const RECORDING_WAIT_MS = 10_000; // the recording is written moments after the socket closes
const RECORDING_POLL_MS = 500;

// States in which a conversation is under way or being set up: Stop is the way out.
const ACTIVE = new Set(["connecting", "waiting", "talking", "busy", "reconnecting"]);
// States in which Start cannot work yet.
const BLOCKED = new Set(["checking", "loading", "failed", "unreachable", "insecure", "nomicapi"]);

const audio = new AudioIO();
const transcript = new Transcript($("transcript"));
const statsView = new StatsView();
const settings = new SettingsForm();
const wakeLock = new ScreenWakeLock();
let view = { state: "checking", vars: {}, actions: [] };
let session = null; // the current Session, or null
let timer = null; // the one pending retry / countdown / poll
let serverStatus = null; // /api/status, polled only until the session's first 0x08 arrives
let serverDroppedBase = null;
let serverStats = null; // the current session's last 0x08 stats message
let realtimeRun = { value: null, count: 0 }; // the latest run of equal `realtime` values
let recordingError = null; // the current conversation's `recording_error`
const recordings = []; // {url, at, ready: null | true | false}: this visit's finished recordings
let reconnectAttempt = 0;
let attemptId = 0; // bumped by Stop, so a microphone prompt answered after Stop connects nothing
let headphonesSeen = storedItem("jmoshi.headphones") === "seen";

// What tests (and a curious person with the console) can read.
const debug = {
  get state() {
    return view.state;
  },
  metadata: null,
  errors: [],
  closeCodes: [],
  stats: null, // the last 0x08 message
  recordings,
  counters: {
    sessions: 0,
    pagesSent: 0,
    bytesSent: 0,
    audioMessages: 0,
    textMessages: 0,
    statsMessages: 0,
    unknownKinds: 0,
  },
  get slowWarning() {
    return !$("slow-warning").hidden;
  },
  get player() {
    return audio.playerStats;
  },
  get renderedSamples() {
    return audio.playerStats.rendered;
  },
  get decodedSamples() {
    return audio.decodedSamples;
  },
  get audioState() {
    return audio.ctx?.state ?? null;
  },
  get levels() {
    return audio.levels();
  },
  get sampleRate() {
    return audio.ctx?.sampleRate ?? null;
  },
  get transcript() {
    return transcript.text;
  },
  get language() {
    return language();
  },
  get latencyMs() {
    return currentStats().latencyMs;
  },
};
window.jmoshi = debug;

// ---- rendering ---------------------------------------------------------------------------

function setState(state, vars = {}, actions = []) {
  view = { state, vars, actions };
  render();
}

let renderedState = null;
let renderedActions = null; // rebuilt only when they change, so a countdown keeps keyboard focus

function render() {
  const { state, vars, actions } = view;
  const box = $("status");
  // A countdown re-renders the same state every second: keep screen readers from repeating it.
  box.setAttribute("aria-live", state === renderedState ? "off" : "polite");
  renderedState = state;
  box.dataset.state = state;
  $("status-title").textContent = t(`state.${state}.title`, vars);
  const body = t(`state.${state}.body`, vars);
  $("status-body").replaceChildren(
    ...body
      .split("\n")
      .filter(Boolean)
      .map((line) => Object.assign(document.createElement("p"), { textContent: line })),
  );
  // A countdown passes the same actions array on every tick: same array, same buttons.
  if (actions !== renderedActions?.actions || language() !== renderedActions.language) {
    $("status-actions").replaceChildren(...actions.map(makeAction));
    renderedActions = { actions, language: language() };
  }
  const focused = document.activeElement;
  $("start").disabled = ACTIVE.has(state) || BLOCKED.has(state);
  $("stop").disabled = !ACTIVE.has(state);
  $("record").disabled = ACTIVE.has(state); // the choice applies from the next Start
  // Keyboard users keep their place: focus moves from the button that just got disabled to the other.
  if (focused?.disabled && (focused.id === "start" || focused.id === "stop")) {
    const other = $(focused.id === "start" ? "stop" : "start");
    if (!other.disabled) other.focus();
  }
  $("headphones").hidden = headphonesSeen || state === "insecure" || state === "nomicapi";
  document.body.classList.toggle("talking", state === "talking");
}

function makeAction(action) {
  if (action.href) {
    return Object.assign(document.createElement("a"), {
      href: action.href,
      className: "button secondary",
      textContent: t(action.label),
    });
  }
  const button = Object.assign(document.createElement("button"), {
    type: "button",
    className: "secondary",
    id: action.id,
    textContent: t(action.label),
  });
  button.addEventListener("click", action.run);
  return button;
}

function clearTimer() {
  clearInterval(timer);
  clearTimeout(timer);
  timer = null;
}

/** Show `state` with a countdown in vars.countdown, then run `done`. */
function countdown(seconds, state, vars, actions, done) {
  clearTimer();
  let left = seconds;
  setState(state, { ...vars, countdown: left }, actions);
  timer = setInterval(() => {
    left -= 1;
    if (left <= 0) {
      clearTimer();
      done();
    } else {
      setState(state, { ...vars, countdown: left }, actions);
    }
  }, 1000);
}

// ---- server readiness --------------------------------------------------------------------

async function fetchJson(path) {
  const response = await fetch(httpUrl(path), { cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch {
    // a proxy's HTML error page: treat as not ready
  }
  return { status: response.status, body };
}

/** "ready" | {phase, reason} while loading/failed | "unreachable" | "unauthorized" */
async function checkReady() {
  try {
    const { status, body } = await fetchJson("readyz");
    if (status === 200) return "ready";
    if (status === 401) return "unauthorized";
    return { phase: body?.phase ?? "loading", reason: body?.reason ?? `HTTP ${status}` };
  } catch {
    return "unreachable";
  }
}

/** Poll /readyz until the model is ready; Start stays disabled meanwhile. */
async function waitUntilReady() {
  clearTimer();
  const result = await checkReady();
  if (ACTIVE.has(view.state)) return; // the person started something meanwhile
  if (result === "ready") {
    setState("ready");
    return;
  }
  if (result === "unauthorized") {
    setState("unauthorized");
    return;
  }
  if (result === "unreachable") setState("unreachable");
  else if (result.phase === "failed") setState("failed", { reason: result.reason });
  else setState("loading", { reason: result.reason });
  timer = setTimeout(waitUntilReady, READY_POLL_MS);
}

function checkBrowser() {
  if (!window.isSecureContext) {
    const https = new URL(window.location.href);
    https.protocol = "https:";
    setState("insecure", {}, [{ href: https.href, label: "openHttps" }]);
    return false;
  }
  if (!navigator.mediaDevices?.getUserMedia || !window.AudioWorkletNode || !window.WebAssembly) {
    setState("nomicapi");
    return false;
  }
  return true;
}

// ---- a conversation ----------------------------------------------------------------------

class Session {
  constructor(url) {
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.handshake = false;
    this.error = null; // the last fatal error the server sent
    this.timedOut = false;
    this.timers = [];
    this.stats = false; // whether a 0x08 stats message arrived
    this.recordingUrl = null;
    this.closed = false;
  }

  send(page) {
    if (!this.handshake || this.ws.readyState !== WebSocket.OPEN) return;
    this.ws.send(audioMessage(page));
    debug.counters.pagesSent += 1;
    debug.counters.bytesSent += page.length;
  }

  close() {
    for (const id of this.timers) clearTimeout(id);
    if (this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "bye");
    if (this.closed) return;
    this.closed = true;
    // Every end (Stop, an error, a lost connection, a reconnect) leaves its recording to download.
    $("recording").hidden = true;
    if (this.recordingUrl) offerRecording(this.recordingUrl);
  }
}

// Errors after which the server keeps the conversation going: only worth a console line.
const RECOVERABLE = new Set(["unknown_kind", "empty_message", "text_frame"]);

async function onStart() {
  // Synchronously inside the tap: iOS only lets audio start from a gesture.
  const resumed = audio.ensureContext();
  hideHeadphones();
  reconnectAttempt = 0;
  if (!settings.validate()) return;
  clearTimer();
  if (transcript.lineCount > 0) transcript.note(t("transcript.newConversation"));
  recordingError = null;
  renderRecordingError();
  $("slow-warning").hidden = true;
  realtimeRun = { value: null, count: 0 };
  setState("connecting");
  wakeLock.acquire();
  const attempt = ++attemptId;
  try {
    await resumed;
    await audio.openMic();
  } catch (err) {
    if (attempt !== attemptId) return;
    endConversation();
    if (err instanceof MicError) {
      const state = { denied: "micDenied", notFound: "noMic" }[err.kind] ?? "micBusy";
      setState(state, { message: err.message });
    } else {
      setState("error", { message: String(err?.message || err) });
    }
    return;
  }
  if (attempt !== attemptId) {
    audio.closeMic(); // Stop was pressed while the permission prompt was open
    return;
  }
  connect();
}

function connect() {
  clearTimer();
  if (session) session.close();
  const params = { ...settings.query().params };
  if ($("record").checked) params.record = "1";
  const current = new Session(chatUrl(params));
  current.params = params;
  session = current;
  debug.counters.sessions += 1;
  debug.metadata = null;
  serverDroppedBase = null;
  serverStats = null;
  setState("connecting");
  const ws = current.ws;
  current.timers.push(
    setTimeout(() => {
      if (ws.readyState === WebSocket.CONNECTING) ws.close(); // onclose: unreachable -> retry
    }, OPEN_TIMEOUT_MS),
  );
  ws.onopen = () => {
    if (session !== current) return;
    const opened = performance.now();
    const tick = () => {
      if (session !== current || current.handshake) return;
      const seconds = Math.round((performance.now() - opened) / 1000);
      if (seconds * 1000 >= HANDSHAKE_TIMEOUT_MS) {
        current.timedOut = true;
        ws.close();
        return;
      }
      setState("waiting", { seconds });
      current.timers.push(setTimeout(tick, 1000));
    };
    tick();
  };
  ws.onmessage = (event) => onMessage(current, event.data);
  ws.onclose = (event) => onClose(current, event);
  audio.startPlayback().catch((err) => failSession(current, err));
}

function failSession(current, err) {
  if (session !== current) return;
  console.error(err);
  endConversation();
  setState("error", { message: String(err?.message || err) });
}

function onMessage(current, data) {
  if (session !== current || !(data instanceof ArrayBuffer)) return;
  const { kind, payload } = parseMessage(data);
  switch (kind) {
    case KIND.HANDSHAKE:
      onHandshake(current);
      break;
    case KIND.METADATA:
      debug.metadata = decodeJson(payload);
      settings.learnServerDefaults(debug.metadata, current.params);
      showRecording(current, debug.metadata);
      break;
    case KIND.AUDIO:
      debug.counters.audioMessages += 1;
      audio.playOgg(payload);
      break;
    case KIND.TEXT:
      debug.counters.textMessages += 1;
      transcript.push(decodeText(payload));
      break;
    case KIND.ERROR: {
      const error = decodeJson(payload) ?? { code: "internal_error", message: "unreadable error" };
      debug.errors.push(error);
      if (RECOVERABLE.has(error.code)) console.warn("server:", error.code, error.message);
      else current.error = error;
      break;
    }
    case KIND.STATS: {
      const stats = decodeJson(payload);
      if (!stats) break;
      debug.counters.statsMessages += 1;
      debug.stats = stats;
      serverStats = stats;
      current.stats = true;
      noteRealtime(stats.realtime);
      break;
    }
    default:
      // Kinds this page does not know are skipped, not fatal.
      debug.counters.unknownKinds += 1;
  }
}

function onHandshake(current) {
  current.handshake = true;
  if (reconnectAttempt > 0) transcript.note(t("transcript.reconnected"));
  reconnectAttempt = 0;
  transcript.breakLine();
  setState("talking");
  audio.startCapture((page) => current.send(page)).catch((err) => failSession(current, err));
  pollServerStatus(current);
}

function onClose(current, event) {
  debug.closeCodes.push(event.code);
  if (session !== current) return; // a session the person already stopped or replaced
  session = null;
  current.close();
  audio.stopCapture();
  audio.stopPlayback();
  const error = current.error;
  if (current.timedOut) return endWith("noAnswer");
  switch (error?.code) {
    case "busy":
      return busyWait(error.session_seconds);
    case "not_ready":
      endWith("loading", { reason: error.message ?? t("reason.loading") });
      return waitUntilReady();
    case "session_limit": {
      const seconds = debug.metadata?.max_session_seconds || 600;
      const limit = seconds < 120 ? t("unit.seconds", { n: seconds }) : t("unit.minutes", { n: Math.round(seconds / 60) });
      return endWith("sessionLimit", { limit });
    }
    case "idle_timeout":
      return endWith("idleTimeout");
    case "unauthorized":
      return endWith("unauthorized");
    case "bad_parameter":
      return endWith("badParameter", { message: error.message });
    case "shutting_down":
      return reconnect(t("reason.shuttingDown"));
    case "slow_consumer":
      return reconnect(t("reason.slow"));
    case undefined:
      return reconnect(t(current.handshake || reconnectAttempt > 0 ? "reason.lost" : "reason.unreachable"));
    default:
      return endWith("error", { message: `${error.code}: ${error.message ?? ""}` });
  }
}

function endWith(state, vars = {}) {
  endConversation();
  setState(state, vars);
}

/** Release everything a conversation holds: socket, microphone, wake lock, timers. */
function endConversation() {
  clearTimer();
  if (session) {
    const old = session;
    session = null;
    old.close();
  }
  audio.stopCapture();
  audio.stopPlayback();
  audio.closeMic();
  audio.suspend();
  wakeLock.release();
}

function busyWait(sessionSeconds) {
  // Give the microphone back while waiting: nobody should be recorded while not talking.
  audio.closeMic();
  const retry = async () => {
    clearTimer();
    setState("connecting");
    const attempt = ++attemptId;
    try {
      await audio.ensureContext();
      await audio.openMic();
    } catch (err) {
      if (attempt !== attemptId) return;
      endConversation();
      setState(err instanceof MicError && err.kind === "denied" ? "micDenied" : "micBusy", {
        message: err.message,
      });
      return;
    }
    if (attempt !== attemptId) {
      audio.closeMic();
      return;
    }
    connect();
  };
  const seconds = Math.round(sessionSeconds ?? 0);
  countdown(BUSY_RETRY_S, "busy", { seconds }, [{ id: "retry", label: "retry", run: retry }], retry);
}

function reconnect(reason) {
  if (reconnectAttempt >= RECONNECT_DELAYS_S.length) {
    endWith("gaveUp");
    return;
  }
  const delay = RECONNECT_DELAYS_S[reconnectAttempt];
  reconnectAttempt += 1;
  const attempt = reconnectAttempt;
  const tryNow = async () => {
    clearTimer();
    const ready = await checkReady();
    if (view.state !== "reconnecting") return; // stopped meanwhile
    if (ready === "ready") connect();
    else if (ready === "unauthorized") endWith("unauthorized");
    else reconnect(t(ready === "unreachable" ? "reason.unreachable" : "reason.loading"));
  };
  countdown(delay, "reconnecting", { attempt, reason }, [{ id: "reconnect", label: "reconnect", run: tryNow }], tryNow);
}

function onStop() {
  attemptId += 1;
  endConversation();
  setState("stopped");
}

// ---- recording ---------------------------------------------------------------------------

function showRecording(current, metadata) {
  current.recordingUrl = metadata?.recording ? metadata.recording_url : null;
  $("recording").hidden = !current.recordingUrl;
  recordingError = metadata?.recording_error ?? null; // the user asked and is not being recorded
  renderRecordingError();
}

function renderRecordingError() {
  $("recording-error").hidden = !recordingError;
  $("recording-error").textContent = recordingError ? t("record.error", { message: recordingError }) : "";
}

/** Same-origin URL of a recording (`part` "transcript" for the JSON), relative to the page. */
function recordingHref(url, part) {
  const href = new URL(httpUrl(url.replace(/^\//, "")));
  if (part) href.searchParams.set("part", part);
  return href.href;
}

/** List a finished session's recording; links once the server has it (404 until it is written). */
async function offerRecording(url) {
  const item = { url, at: new Date(), ready: null };
  recordings.push(item);
  renderRecordings();
  const deadline = performance.now() + RECORDING_WAIT_MS;
  for (;;) {
    try {
      const response = await fetch(recordingHref(url, "transcript"), { cache: "no-store" });
      if (response.ok) break;
    } catch {
      // the network hiccuped: try again until the deadline
    }
    if (performance.now() > deadline) {
      item.ready = false; // show the links anyway, with a note: the server may still be writing
      renderRecordings();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, RECORDING_POLL_MS));
  }
  item.ready = true;
  renderRecordings();
}

function renderRecordings() {
  $("recordings").hidden = recordings.length === 0;
  const element = (tag, props) => Object.assign(document.createElement(tag), props);
  const link = (href, label, className) => element("a", { href, className, textContent: t(label) });
  $("recording-list").replaceChildren(
    ...recordings.map((item) => {
      const li = document.createElement("li");
      const time = item.at.toLocaleTimeString(language() === "ja" ? "ja-JP" : "en-GB");
      li.append(element("span", { textContent: `${t("record.item", { time })}: ` }));
      if (item.ready === null) {
        li.append(t("record.preparing"));
        return li;
      }
      li.append(
        link(recordingHref(item.url), "record.wav", "recording-wav"),
        " ",
        link(recordingHref(item.url, "transcript"), "record.transcript", "recording-transcript"),
      );
      if (item.ready === false) li.append(element("p", { className: "hint", textContent: t("record.notYet") }));
      return li;
    }),
  );
}

// ---- server stats while talking ----------------------------------------------------------

/** Shows or hides the slow-GPU warning once SLOW_AFTER stats messages in a row agree. */
function noteRealtime(value) {
  if (typeof value !== "boolean") return; // null: no frame was stepped in the window
  realtimeRun = value === realtimeRun.value ? { value, count: realtimeRun.count + 1 } : { value, count: 1 };
  if (realtimeRun.count >= SLOW_AFTER) $("slow-warning").hidden = value;
}

/** /api/status, for a server that sends no 0x08 stats message (older, or stats turned off). */
async function pollServerStatus(current) {
  while (session === current && !current.stats) {
    try {
      const { status, body } = await fetchJson("api/status");
      if (status === 200 && body) {
        serverStatus = body;
        if (serverDroppedBase === null) serverDroppedBase = body.frames_dropped ?? 0;
      }
    } catch {
      // the socket's close will say what happened
    }
    await new Promise((resolve) => setTimeout(resolve, STATUS_POLL_MS));
  }
}

function currentStats() {
  const player = audio.playerStats;
  const talking = view.state === "talking";
  // The stats message counts this session's drops itself; the polled status counts the server's.
  const serverDroppedMs = serverStats
    ? (serverStats.dropped_frames ?? 0) * (serverStats.frame_ms ?? FRAME_MS)
    : serverStatus && serverDroppedBase !== null
      ? Math.max(0, (serverStatus.frames_dropped ?? 0) - serverDroppedBase) * FRAME_MS
      : null;
  const latencyMs =
    talking && audio.receivedSeconds > 0
      ? estimateLatencyMs({
          sentMs: audio.sentSeconds * 1000,
          receivedMs: audio.receivedSeconds * 1000,
          serverDroppedMs: serverDroppedMs ?? 0,
          bufferedMs: player.bufferedMs,
        })
      : null;
  return {
    latencyMs,
    bufferedMs: talking ? player.bufferedMs : null,
    droppedMs: player.droppedMs,
    serverDroppedMs,
    underruns: player.underruns,
    server: serverStatus,
    stats: serverStats,
    metadata: debug.metadata,
  };
}

// ---- phones: screen and audio after the page was hidden ----------------------------------

document.addEventListener("visibilitychange", () => {
  // The browser drops the lock when the page is hidden and phones may pause audio: take both back.
  if (document.visibilityState === "visible" && ACTIVE.has(view.state)) {
    wakeLock.acquire();
    audio.ctx?.resume().catch(() => {});
  }
});

// ---- language, stats toggle, headphones --------------------------------------------------

function storedItem(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null;
  }
}

function storeItem(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // storage refused: the choice lasts for this visit
  }
}

function setLanguage(lang) {
  applyLanguage(lang);
  for (const code of LANGUAGES) $(`lang-${code}`).setAttribute("aria-pressed", String(code === lang));
  renderStatsToggle();
  settings.renderLanguage();
  if (!$("stats").hidden) statsView.render(currentStats());
  renderRecordings();
  renderRecordingError();
  render();
}

function renderStatsToggle() {
  const open = !$("stats").hidden;
  const toggle = $("stats-toggle");
  toggle.textContent = t(open ? "stats.hide" : "stats.show");
  toggle.setAttribute("aria-expanded", String(open));
}

function setupToggles() {
  for (const code of LANGUAGES) {
    $(`lang-${code}`).addEventListener("click", () => {
      storeItem("jmoshi.lang", code);
      setLanguage(code);
    });
  }
  $("stats").hidden = storedItem("jmoshi.stats") !== "1";
  $("stats-toggle").addEventListener("click", () => {
    $("stats").hidden = !$("stats").hidden;
    storeItem("jmoshi.stats", $("stats").hidden ? "0" : "1");
    renderStatsToggle();
  });
  $("record").checked = storedItem("jmoshi.record") === "1"; // unchecked unless chosen before
  $("record").addEventListener("change", () => storeItem("jmoshi.record", $("record").checked ? "1" : "0"));
  $("headphones-ok").addEventListener("click", () => {
    hideHeadphones();
    $("start").focus();
  });
}

function hideHeadphones() {
  if (headphonesSeen) return;
  headphonesSeen = true;
  $("headphones").hidden = true;
  storeItem("jmoshi.headphones", "seen");
}

// ---- meters and stats loop ---------------------------------------------------------------

function drawMeters() {
  const { mic, model } = audio.levels();
  $("meter-mic").style.transform = `scaleX(${mic.toFixed(3)})`;
  $("meter-model").style.transform = `scaleX(${model.toFixed(3)})`;
  requestAnimationFrame(drawMeters);
}

setInterval(() => {
  if (!$("stats").hidden) statsView.render(currentStats());
}, STATS_RENDER_MS);

// ---- start-up ----------------------------------------------------------------------------

setLanguage(pickLanguage(storedItem("jmoshi.lang"), navigator.language));
setupToggles();
renderStatsToggle();
$("start").addEventListener("click", onStart);
$("stop").addEventListener("click", onStop);
audio.onMicEnded = () => {
  if (ACTIVE.has(view.state)) endWith("noMic");
};
requestAnimationFrame(drawMeters);
if (checkBrowser()) waitUntilReady();
