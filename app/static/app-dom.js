// Small DOM helpers shared by the web app's modules. Everything that comes from the server is
// put into the page as text (textContent, attributes set one by one), never parsed as HTML.

/**
 * Make an element.
 * @param {string} tag
 * @param {{className?: string, text?: string, attrs?: Object<string, string>}} [props]
 * @param {Array<Node|string|null|undefined>} [children] strings become text nodes
 * @returns {HTMLElement}
 */
export function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  if (props.className) node.className = props.className;
  if (props.text !== undefined) node.textContent = props.text;
  for (const [name, value] of Object.entries(props.attrs || {})) node.setAttribute(name, value);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return node;
}

/** @param {string} selector @returns {HTMLElement} the one element (the page's own markup) */
export function $(selector) {
  const node = document.querySelector(selector);
  if (!node) throw new Error(`missing element ${selector}`);
  return /** @type {HTMLElement} */ (node);
}

/** Show one element and hide the others (the `hidden` attribute; the CSS makes it win). */
export function showOnly(shown, all) {
  for (const node of all) node.hidden = node !== shown;
}

/**
 * A timestamp as a short local time (today) or date and time, for people.
 * @param {string|undefined} iso
 * @returns {string}
 */
export function formatTime(iso) {
  if (!iso) return '';
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return '';
  const sameDay = when.toDateString() === new Date().toDateString();
  const time = when.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'});
  return sameDay ? time : `${when.toLocaleDateString([], {month: 'short', day: 'numeric'})} ${time}`;
}

/** A <time> element for an ISO timestamp (empty when there is none). */
export function timeNode(iso) {
  const text = formatTime(iso);
  return text ? el('time', {className: 'time', text, attrs: {datetime: iso}}) : null;
}

/** Any value as readable JSON text (for generic rows); never throws. */
export function asJson(value) {
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

/** An error (OpenHandsError or other) as one sentence for the notice line. */
export function errorText(error) {
  if (!error) return 'Something went wrong.';
  const status = typeof error.status === 'number' && error.status ? ` (HTTP ${error.status})` : '';
  return `${error.message || String(error)}${status}`;
}
