// The stats panel: latency estimate, playback buffer, dropped audio, server step time.

import { t } from "./i18n.js";

const FRAME_MS = 80; // one model frame

/**
 * Mouth-to-ear delay the person experiences, estimated from what the page can count:
 * audio sent but not yet answered (network both ways, the server's input queue and model
 * step, the model's own frame delay) plus audio waiting in the playback buffer. Input frames
 * the server dropped will never be answered, so they are taken out.
 */
export function estimateLatencyMs({ sentMs, receivedMs, serverDroppedMs = 0, bufferedMs = 0 }) {
  return Math.max(0, sentMs - receivedMs - serverDroppedMs) + bufferedMs;
}

const ms = (value) => (value == null ? t("stats.none") : `${Math.round(value)} ms`);

export class StatsView {
  constructor(doc = document) {
    this.el = (id) => doc.getElementById(id);
  }

  /**
   * data: {latencyMs, bufferedMs, droppedMs, serverDroppedMs, underruns, server, stats, metadata}.
   * `stats` (the 0x08 message) wins over `server` (/api/status, polled when no 0x08 comes).
   */
  render(data) {
    const { server, stats, metadata } = data;
    this.el("stat-latency").textContent = ms(data.latencyMs);
    this.el("stat-buffered").textContent = ms(data.bufferedMs);
    this.el("stat-dropped").textContent = ms(data.droppedMs);
    this.el("stat-server-dropped").textContent =
      stats && data.serverDroppedMs != null
        ? t("stats.droppedDetail", { ms: Math.round(data.serverDroppedMs), n: stats.dropped_frames ?? 0 })
        : ms(data.serverDroppedMs);
    this.el("stat-underruns").textContent =
      data.underruns == null ? t("stats.none") : t("stats.times", { n: data.underruns });
    const step = stats ? stats.step_ms?.p50 : server?.step_ms_p50;
    const p95 = stats?.step_ms?.p95?.total;
    const vars = { total: Math.round(step?.total), lm: Math.round(step?.lm ?? 0), p95: Math.round(p95) };
    this.el("stat-step").textContent =
      step?.total == null ? t("stats.none") : t(p95 == null ? "stats.stepDetail" : "stats.stepP95", vars);
    this.el("stat-warning").hidden = !(step?.total > (stats?.frame_ms ?? FRAME_MS));
    const model = metadata?.model ?? server?.model;
    const device = metadata?.device ?? server?.device;
    this.el("stat-model").textContent = model ? `${model} (${device ?? "?"})` : t("stats.none");
    const s = metadata?.sampling;
    this.el("stat-sampling").textContent = s
      ? `text ${s.text_temperature} / ${s.text_topk}, audio ${s.audio_temperature} / ${s.audio_topk}, seed ${s.seed}`
      : t("stats.none");
  }
}

export { FRAME_MS };
