// Sampling settings: kept in localStorage, checked against the ranges the server accepts
// (jmoshi_server/protocol.py), and turned into the chat URL's query parameters.
//
// An empty field means "the server's default", so a page never overrides what the person
// running the server configured unless the user asked for it.

const STORAGE_KEY = "jmoshi.settings.v1";

export const FIELDS = [
  { name: "text_temperature", kind: "float", min: 0, max: 5, step: 0.05 },
  { name: "text_topk", kind: "int", min: 1, max: 100000, step: 1 },
  { name: "audio_temperature", kind: "float", min: 0, max: 5, step: 0.05 },
  { name: "audio_topk", kind: "int", min: 1, max: 100000, step: 1 },
  // The server takes any 63-bit seed; digits are kept as a string so JS numbers never round it.
  { name: "seed", kind: "int", min: 0, max: "9223372036854775807", step: 1 },
];

export function loadSettings(storage = localStorage) {
  try {
    const saved = JSON.parse(storage.getItem(STORAGE_KEY) || "{}");
    return Object.fromEntries(FIELDS.map((f) => [f.name, typeof saved[f.name] === "string" ? saved[f.name] : ""]));
  } catch {
    return Object.fromEntries(FIELDS.map((f) => [f.name, ""]));
  }
}

export function saveSettings(values, storage = localStorage) {
  try {
    storage.setItem(STORAGE_KEY, JSON.stringify(values));
  } catch {
    // Private browsing can refuse storage; the settings still apply to this visit.
  }
}

export function clearSettings(storage = localStorage) {
  try {
    storage.removeItem(STORAGE_KEY);
  } catch {
    // as above
  }
}

function fitsInt(text, min, max) {
  if (!/^\d+$/.test(text)) return false;
  const value = BigInt(text);
  return value >= BigInt(min) && value <= BigInt(max);
}

/** Returns the field's error ("invalid"/"invalidInt") or null; empty is always fine. */
export function checkField(field, raw) {
  const text = raw.trim();
  if (text === "") return null;
  if (field.kind === "int") return fitsInt(text, field.min, field.max) ? null : "invalidInt";
  const value = Number(text);
  return Number.isFinite(value) && value >= field.min && value <= field.max ? null : "invalid";
}

/** {params, errors}: params holds only the fields the user filled in. */
export function toQuery(values) {
  const params = {};
  const errors = {};
  for (const field of FIELDS) {
    const text = (values[field.name] || "").trim();
    const error = checkField(field, text);
    if (error) errors[field.name] = error;
    else if (text !== "") params[field.name] = field.kind === "int" ? String(BigInt(text)) : String(Number(text));
  }
  return { params, errors };
}
