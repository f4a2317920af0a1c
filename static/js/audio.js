// Audio in and out.
//
// In:  microphone -> opus-recorder's encoder worklet -> Ogg/Opus pages at 24 kHz (40 ms each).
// Out: Ogg/Opus from the server -> opus-recorder's decoder worker (WASM, resamples to the
//      context's rate) -> jitter-buffer worklet -> speakers.
// One decoder for every browser: a Worker + WASM runs on iPhone Safari as well as on desktops,
// so there is a single path to test rather than a WebCodecs path beside a fallback.
// One AudioContext lives for the whole visit; it is created and resumed inside the Start tap,
// because iOS keeps a context that was not started from a gesture silent.

const VENDOR = new URL("../vendor/opus-recorder/", import.meta.url).href;
const PLAYER_WORKLET = new URL("../worklets/player.js", import.meta.url).href;

// Jitter buffer: start after 80 ms (one model frame); past 320 ms, drop the oldest back to 160 ms.
export const PLAYER_OPTIONS = { startMs: 80, maxMs: 320, keepMs: 160 };

/** Why the microphone could not be opened: denied | notFound | busy | unsupported. */
export class MicError extends Error {
  constructor(kind, cause) {
    super(cause?.message || kind);
    this.kind = kind;
    this.cause = cause;
  }
}

function classifyMicError(err) {
  switch (err?.name) {
    case "NotAllowedError":
    case "SecurityError":
    case "PermissionDeniedError":
      return "denied";
    case "NotFoundError":
    case "DevicesNotFoundError":
    case "OverconstrainedError":
      return "notFound";
    default:
      return "busy"; // NotReadableError / AbortError: the device exists but cannot be opened
  }
}

function level(analyser, scratch) {
  if (!analyser) return 0;
  analyser.getFloatTimeDomainData(scratch);
  let sum = 0;
  for (const v of scratch) sum += v * v;
  const db = 10 * Math.log10(sum / scratch.length + 1e-12);
  return Math.min(1, Math.max(0, (db + 60) / 60)); // -60 dB .. 0 dB -> 0 .. 1
}

export class AudioIO {
  constructor() {
    this.ctx = null;
    this.stream = null;
    this.recorder = null;
    this.decoder = null;
    this.player = null;
    this.playerStats = { bufferedMs: 0, rendered: 0, droppedMs: 0, dropped: 0, underruns: 0, playing: false };
    this.decodedSamples = 0;
    this.onMicEnded = () => {};
    this.scratch = new Float32Array(1024);
  }

  /** Call synchronously from the tap handler (before any await). */
  ensureContext() {
    if (!this.ctx) {
      const Context = window.AudioContext || window.webkitAudioContext;
      this.ctx = new Context({ latencyHint: "interactive" });
      this.micAnalyser = this.makeAnalyser();
      this.modelAnalyser = this.makeAnalyser();
      this.workletLoaded = this.ctx.audioWorklet.addModule(PLAYER_WORKLET);
      this.workletLoaded.catch(() => {}); // reported where it is awaited
    }
    return this.ctx.resume();
  }

  makeAnalyser() {
    const analyser = this.ctx.createAnalyser();
    analyser.fftSize = this.scratch.length;
    return analyser;
  }

  async openMic() {
    if (this.stream) return;
    // Safari 16.4+: ask for a call-style session so output stays on the speaker or headphones.
    if (navigator.audioSession) navigator.audioSession.type = "play-and-record";
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (err) {
      throw new MicError(classifyMicError(err), err);
    }
    const track = this.stream.getAudioTracks()[0];
    if (track) track.addEventListener("ended", () => this.onMicEnded());
    this.micSource = this.ctx.createMediaStreamSource(this.stream);
    this.micSource.connect(this.micAnalyser);
  }

  closeMic() {
    if (this.micSource) this.micSource.disconnect();
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.stream = null;
    this.micSource = null;
    if (navigator.audioSession) navigator.audioSession.type = "auto";
  }

  /** Decoder worker and jitter buffer for one session. */
  async startPlayback() {
    this.stopPlayback();
    await this.workletLoaded;
    const ctx = this.ctx;
    const player = new AudioWorkletNode(ctx, "jitter-buffer-player", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: PLAYER_OPTIONS,
    });
    player.port.onmessage = (event) => {
      if (event.data.type === "stats") this.playerStats = event.data;
    };
    player.connect(ctx.destination);
    player.connect(this.modelAnalyser);
    const decoder = new Worker(VENDOR + "decoderWorker.min.js");
    decoder.postMessage({
      command: "init",
      decoderSampleRate: 48000, // Opus decodes natively at 48 kHz whatever the stream's rate
      outputBufferSampleRate: ctx.sampleRate,
      bufferLength: Math.round(ctx.sampleRate * 0.02), // hand over 20 ms at a time
      resampleQuality: 3,
    });
    decoder.onmessage = (event) => {
      const samples = event.data?.[0];
      if (!(samples instanceof Float32Array) || this.player !== player) return;
      this.decodedSamples += samples.length;
      player.port.postMessage({ type: "push", samples }, [samples.buffer]);
    };
    this.player = player;
    this.decoder = decoder;
    this.decodedSamples = 0;
    this.playerStats = { bufferedMs: 0, rendered: 0, droppedMs: 0, dropped: 0, underruns: 0, playing: false };
  }

  /** payload: Uint8Array with its own buffer (ownership moves to the worker). */
  playOgg(payload) {
    if (this.decoder) this.decoder.postMessage({ command: "decode", pages: payload }, [payload.buffer]);
  }

  stopPlayback() {
    if (this.decoder) this.decoder.terminate();
    if (this.player) {
      this.player.port.postMessage({ type: "reset" });
      this.player.disconnect();
    }
    this.decoder = null;
    this.player = null;
  }

  /** Encode the microphone and call onPage(Uint8Array) for every Ogg page. */
  async startCapture(onPage) {
    this.stopCapture();
    // A source node of its own: Recorder.close() disconnects every output of the node it uses.
    const source = this.ctx.createMediaStreamSource(this.stream);
    const recorder = new window.Recorder({
      sourceNode: source,
      encoderPath: VENDOR + "encoderWorker.min.js",
      encoderSampleRate: 24000,
      encoderFrameSize: 20,
      maxFramesPerPage: 2, // a page every 40 ms: half a model frame, small enough not to add delay
      encoderApplication: 2049, // full-band audio: closest to the raw audio the model learned from
      numberOfChannels: 1,
      streamPages: true,
      monitorGain: 0,
      recordingGain: 1,
    });
    recorder.ondataavailable = (page) => {
      if (this.recorder === recorder) onPage(page);
    };
    this.recorder = recorder;
    await recorder.start();
  }

  stopCapture() {
    const recorder = this.recorder;
    this.recorder = null;
    if (recorder) {
      try {
        recorder.close();
      } catch {
        // closing a recorder that never started: nothing to release
      }
    }
  }

  /** Seconds of microphone audio encoded so far (opus-recorder counts at 48 kHz). */
  get sentSeconds() {
    return this.recorder ? this.recorder.encodedSamplePosition / 48000 : 0;
  }

  get receivedSeconds() {
    return this.ctx ? this.decodedSamples / this.ctx.sampleRate : 0;
  }

  levels() {
    return {
      mic: this.stream ? level(this.micAnalyser, this.scratch) : 0,
      model: this.player ? level(this.modelAnalyser, this.scratch) : 0,
    };
  }

  /** Save battery between conversations; the next Start tap resumes it. */
  suspend() {
    if (this.ctx && this.ctx.state === "running") this.ctx.suspend().catch(() => {});
  }
}
