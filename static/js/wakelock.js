// Keeps a phone's screen on while talking (a dark screen can pause the page's audio).
// Browsers drop the lock when the page is hidden; call acquire() again when it is visible.

export class ScreenWakeLock {
  constructor() {
    this.lock = null;
  }

  async acquire() {
    if (this.lock || !navigator.wakeLock) return;
    try {
      const lock = await navigator.wakeLock.request("screen");
      lock.addEventListener("release", () => {
        if (this.lock === lock) this.lock = null;
      });
      this.lock = lock;
    } catch {
      // refused (battery saver, hidden page): the conversation works anyway
    }
  }

  release() {
    this.lock?.release().catch(() => {});
    this.lock = null;
  }
}
