// Jitter buffer for the model's voice, running on the audio thread.
//
// The main thread posts decoded mono chunks ({type: "push", samples: Float32Array}). Playback
// starts once `startMs` is buffered; when the buffer grows past `maxMs` (the network or the GPU
// delivered a burst) the oldest audio is dropped down to `keepMs`, so the delay between the
// model speaking and the person hearing it stays bounded instead of growing for the whole
// session. After an underrun it waits for `startMs` again rather than stuttering block by block.

const REPORT_EVERY_BLOCKS = 32; // ~85 ms at 48 kHz
const FADE_SAMPLES = 96; // ~2 ms fade-in after a gap or a drop, so jumps do not click

class JitterBufferPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    const perMs = sampleRate / 1000;
    this.startSamples = Math.round((opts.startMs ?? 80) * perMs);
    this.maxSamples = Math.round((opts.maxMs ?? 320) * perMs);
    this.keepSamples = Math.round((opts.keepMs ?? 160) * perMs);
    this.chunks = []; // Float32Array queue, oldest first
    this.offset = 0; // read position inside chunks[0]
    this.buffered = 0; // samples queued and not yet played
    this.playing = false;
    this.fade = 0; // samples left of the current fade-in
    this.rendered = 0; // samples taken from the buffer and played
    this.dropped = 0; // samples thrown away to bound latency
    this.underruns = 0; // times playback ran dry and had to re-buffer
    this.blocks = 0;
    this.port.onmessage = (event) => this.onMessage(event.data);
  }

  onMessage(msg) {
    if (msg.type === "push") {
      this.chunks.push(msg.samples);
      this.buffered += msg.samples.length;
      if (this.buffered > this.maxSamples) this.dropOldest(this.buffered - this.keepSamples);
    } else if (msg.type === "reset") {
      this.chunks = [];
      this.offset = 0;
      this.buffered = 0;
      this.playing = false;
      this.report();
    }
  }

  dropOldest(count) {
    this.dropped += count;
    this.buffered -= count;
    while (count > 0) {
      const left = this.chunks[0].length - this.offset;
      if (left > count) {
        this.offset += count;
        count = 0;
      } else {
        count -= left;
        this.chunks.shift();
        this.offset = 0;
      }
    }
    this.fade = FADE_SAMPLES;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered >= this.startSamples) {
      this.playing = true;
      this.fade = FADE_SAMPLES;
    }
    let i = 0;
    if (this.playing) {
      while (i < out.length && this.chunks.length) {
        const chunk = this.chunks[0];
        const n = Math.min(out.length - i, chunk.length - this.offset);
        for (let k = 0; k < n; k++) {
          let gain = 1;
          if (this.fade > 0) gain = 1 - this.fade-- / FADE_SAMPLES;
          out[i + k] = chunk[this.offset + k] * gain;
        }
        i += n;
        this.offset += n;
        if (this.offset >= chunk.length) {
          this.chunks.shift();
          this.offset = 0;
        }
      }
      this.rendered += i;
      this.buffered -= i;
      if (i < out.length) {
        this.playing = false; // ran dry: wait for startMs again
        this.underruns++;
      }
    }
    out.fill(0, i);
    // Mono source: copy to any further output channels (stereo destinations).
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (++this.blocks % REPORT_EVERY_BLOCKS === 0) this.report();
    return true;
  }

  report() {
    this.port.postMessage({
      type: "stats",
      bufferedMs: (this.buffered / sampleRate) * 1000,
      rendered: this.rendered,
      droppedMs: (this.dropped / sampleRate) * 1000,
      dropped: this.dropped,
      underruns: this.underruns,
      playing: this.playing,
      sampleRate,
    });
  }
}

registerProcessor("jitter-buffer-player", JitterBufferPlayer);
