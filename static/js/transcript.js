// The model's words, one line per sentence: a line ends after 。！？ (or ! ?) and when the
// model pauses long enough that what follows is a new utterance. Follows the newest line
// unless the reader scrolled up to read older ones.

const SENTENCE_END = /[。！？!?]/;
const CLOSERS = /[」』）)】〉》"'”’]/; // stay on the line they close, after 。 etc.
const MAX_LINES = 400; // a 10-minute talk fits; keeps the DOM small on phones
const FOLLOW_SLACK_PX = 48;
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/g; // invisible at best, layout-breaking at worst

export class Transcript {
  /**
   * @param {HTMLElement} element the scrolling container
   * @param {{pauseMs?: number, now?: () => number}} options
   */
  constructor(element, { pauseMs = 1200, now = () => performance.now() } = {}) {
    this.element = element;
    this.pauseMs = pauseMs;
    this.now = now;
    this.line = null; // the <p> being written, or null when the next character starts a line
    this.lastAt = -Infinity;
  }

  get text() {
    return [...this.element.querySelectorAll("p.line")].map((p) => p.textContent).join("\n");
  }

  get lineCount() {
    return this.element.querySelectorAll("p.line").length;
  }

  push(text) {
    text = text.replace(CONTROL, "");
    if (!text) return;
    const now = this.now();
    const follow = this.isFollowing();
    if (now - this.lastAt > this.pauseMs) this.line = null;
    this.lastAt = now;
    for (const char of text) {
      if (this.line === null && CLOSERS.test(char) && this.lastLine()) {
        this.lastLine().textContent += char;
        continue;
      }
      if (this.line === null) this.line = this.addLine("line");
      this.line.textContent += char;
      if (SENTENCE_END.test(char)) this.line = null;
    }
    if (follow) this.scrollToEnd();
  }

  /** A visible note between lines (e.g. "reconnected"); the next text starts a new line. */
  note(text) {
    const last = this.element.lastElementChild;
    if (last?.classList.contains("note") && last.textContent === text) return; // no repeats
    const follow = this.isFollowing();
    this.addLine("note").textContent = text;
    this.line = null;
    if (follow) this.scrollToEnd();
  }

  /** Ends the current line: the next text starts a new one. */
  breakLine() {
    this.line = null;
  }

  clear() {
    this.element.replaceChildren();
    this.line = null;
    this.lastAt = -Infinity;
  }

  lastLine() {
    const last = this.element.lastElementChild;
    return last && last.classList.contains("line") ? last : null;
  }

  addLine(kind) {
    const p = document.createElement("p");
    p.className = kind;
    this.element.append(p);
    while (this.element.childElementCount > MAX_LINES) this.element.firstElementChild.remove();
    return p;
  }

  isFollowing() {
    const el = this.element;
    return el.scrollHeight - el.scrollTop - el.clientHeight < FOLLOW_SLACK_PX;
  }

  scrollToEnd() {
    this.element.scrollTop = this.element.scrollHeight;
  }
}
