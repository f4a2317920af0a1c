// The settings form: edits are saved as they are typed, errors shown beside each field, and
// empty fields show the server's default once a session has told us what it is.

import { t } from "./i18n.js";
import { checkField, clearSettings, FIELDS, loadSettings, saveSettings, toQuery } from "./settings.js";

export class SettingsForm {
  constructor(doc = document) {
    this.$ = (id) => doc.getElementById(id);
    this.values = loadSettings();
    this.serverDefaults = {};
    this.savedNote = false;
    this.fill();
    this.$("settings-form").addEventListener("input", (event) => this.onInput(event.target));
    this.$("settings-form").addEventListener("submit", (event) => event.preventDefault());
    this.$("settings-reset").addEventListener("click", () => this.reset());
  }

  /** {params, errors} for the chat URL. */
  query() {
    return toQuery(this.values);
  }

  /** Shows the errors of the current values; returns false (and focuses the first) if any. */
  validate() {
    if (!this.showErrors(this.query().errors)) return true;
    this.$("settings").open = true;
    const first = FIELDS.find((f) => this.$(`set-${f.name}`).getAttribute("aria-invalid") === "true");
    this.$(`set-${first.name}`).focus();
    return false;
  }

  onInput(input) {
    const field = FIELDS.find((f) => f.name === input.name);
    if (!field) return;
    this.values = { ...this.values, [field.name]: input.value };
    saveSettings(this.values);
    this.showErrors({ ...this.query().errors, [field.name]: checkField(field, input.value) });
    this.savedNote = true;
    this.renderSavedNote();
  }

  reset() {
    clearSettings();
    this.values = loadSettings();
    this.fill();
    this.showErrors({});
    this.savedNote = false;
    this.renderSavedNote();
  }

  fill() {
    for (const field of FIELDS) this.$(`set-${field.name}`).value = this.values[field.name];
  }

  /** Remember the defaults a session used for the fields its URL left out. */
  learnServerDefaults(metadata, params) {
    for (const field of FIELDS) {
      const value = metadata?.sampling?.[field.name];
      if (field.name !== "seed" && !(field.name in params) && value != null) this.serverDefaults[field.name] = value;
    }
    this.renderPlaceholders();
  }

  renderPlaceholders() {
    for (const field of FIELDS) {
      if (field.name === "seed") continue; // empty seed means "random each time", not a default
      const known = this.serverDefaults[field.name];
      this.$(`set-${field.name}`).placeholder =
        known == null ? t("settings.default") : `${t("settings.default")} (${known})`;
    }
  }

  showErrors(errors) {
    let any = false;
    for (const field of FIELDS) {
      const key = errors[field.name];
      this.$(`err-${field.name}`).textContent = key ? t(`settings.${key}`, { min: field.min, max: field.max }) : "";
      this.$(`set-${field.name}`).setAttribute("aria-invalid", key ? "true" : "false");
      any ||= Boolean(key);
    }
    return any;
  }

  renderSavedNote() {
    this.$("settings-saved").textContent = this.savedNote ? t("settings.saved") : "";
  }

  /** After a language switch: every text this form set from code. */
  renderLanguage() {
    this.renderPlaceholders();
    this.renderSavedNote();
    this.showErrors(this.query().errors);
  }
}
