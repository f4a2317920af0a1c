// The moshi wire protocol as this server speaks it (jmoshi_server/protocol.py): every WebSocket
// message is binary and its first byte is the kind.

export const KIND = {
  HANDSHAKE: 0x00, // server: the session holds the model; start sending audio
  AUDIO: 0x01, // both ways: Ogg/Opus pages, 24 kHz mono
  TEXT: 0x02, // server: UTF-8 text, whole characters
  METADATA: 0x04, // server: JSON right after the handshake
  ERROR: 0x05, // server: JSON {code, message, ...}; the socket closes after most of them
  STATS: 0x08, // server: JSON about once a second (docs/protocol-stats.md); jmoshi-server only
};

const utf8 = new TextDecoder("utf-8");

/** {kind, payload: Uint8Array (own buffer, offset 0)} from a received ArrayBuffer. */
export function parseMessage(buffer) {
  const bytes = new Uint8Array(buffer);
  // slice() copies: the Opus decoder worker reads payload.buffer from offset 0.
  return { kind: bytes.length ? bytes[0] : -1, payload: bytes.slice(1) };
}

export function decodeText(payload) {
  return utf8.decode(payload);
}

export function decodeJson(payload) {
  try {
    return JSON.parse(utf8.decode(payload));
  } catch {
    return null;
  }
}

export function audioMessage(page) {
  const message = new Uint8Array(page.length + 1);
  message[0] = KIND.AUDIO;
  message.set(page, 1);
  return message;
}

/** The token the page was opened with (?token=...), passed on to the server's other URLs. */
export function pageToken(location = window.location) {
  return new URLSearchParams(location.search).get("token");
}

function withToken(url, location) {
  const token = pageToken(location);
  if (token) url.searchParams.set("token", token);
  return url;
}

/** ws(s)://<this origin>/api/chat?<settings> */
export function chatUrl(params, location = window.location) {
  const url = new URL("api/chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  url.hash = "";
  for (const [name, value] of Object.entries(params)) url.searchParams.set(name, value);
  return withToken(url, location).href;
}

/** Same-origin HTTP URL (readyz, api/status) relative to where the page lives. */
export function httpUrl(path, location = window.location) {
  const url = new URL(path, location.href);
  url.search = "";
  url.hash = "";
  return withToken(url, location).href;
}
