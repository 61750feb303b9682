/**
 * @file Live replies of the browser client (openhands-client.js is the entry point; import that).
 *
 * The stream's `agent_message_delta` events carry bits of a reply at offsets counted in
 * characters (code points, as Python counts them, not UTF-16 units); `LiveReplies` rebuilds each
 * reply so far from them, by the user event it answers. It imports nothing.
 */

/**
 * The argument of a `delta` handler: one live bit of an agent's reply.
 * @typedef {Object} ReplyDelta
 * @property {number} cause the user event the reply answers
 * @property {number} offset where `text` starts in the reply so far, in characters (code points)
 * @property {string} text
 * @property {string} content the reply so far, rebuilt from the deltas
 */

/**
 * The number of code points in `text` (the API counts reply offsets in characters, as Python does).
 * @param {string} text
 * @returns {number}
 */
function codePoints(text) {
  let count = 0;
  for (let i = 0; i < text.length; i += 1) {
    const unit = text.charCodeAt(i);
    if (unit >= 0xd800 && unit <= 0xdbff && i + 1 < text.length) {
      const next = text.charCodeAt(i + 1);
      if (next >= 0xdc00 && next <= 0xdfff) i += 1;
    }
    count += 1;
  }
  return count;
}

/**
 * The first `count` code points of `text`.
 * @param {string} text
 * @param {number} count
 * @returns {string}
 */
function headCodePoints(text, count) {
  let out = '';
  let taken = 0;
  for (const ch of text) {
    if (taken >= count) break;
    out += ch;
    taken += 1;
  }
  return out;
}

/**
 * The replies being streamed, by cause (the user event each answers), until their runs end.
 */
export class LiveReplies {
  constructor() {
    /** @private {Map<number, {text: string, length: number}>} replies so far, by cause */
    this._partials = new Map();
    /** @private {Set<number>} causes whose run ended: a late delta for them is dropped */
    this._finished = new Set();
    /** @private {Set<number>} causes whose deltas skipped text: dropped until an offset 0 or the stored reply */
    this._gapped = new Set();
  }

  /** Forget every reply (another conversation). */
  clear() {
    this._partials.clear();
    this._finished.clear();
    this._gapped.clear();
  }

  /**
   * The reply to `cause` is stored (an agent_message): its live copy is dropped.
   * @param {number} cause
   */
  stored(cause) {
    this._partials.delete(cause);
    this._gapped.delete(cause);
  }

  /**
   * A run ended (its agent state is no longer `running`): its later deltas are dropped.
   * @param {?number} cause null when the state change names no cause: every live copy is dropped
   */
  ended(cause) {
    if (cause === null) {
      this._partials.clear();
      this._gapped.clear();
    } else {
      this._partials.delete(cause);
      this._gapped.delete(cause);
      this._finished.add(cause);
    }
  }

  /**
   * Apply a delta: the reply so far, or null when it is dropped: its run has ended, or it starts
   * past the end of the reply so far (text was lost: the reply's deltas are dropped from then on
   * until one at offset 0, the text so far, or the stored reply comes).
   * @param {number} cause
   * @param {number} offset where `text` starts, in code points
   * @param {string} text
   * @returns {?string}
   */
  apply(cause, offset, text) {
    if (this._finished.has(cause)) return null; // its run has ended: the stored events are the truth
    const before = this._partials.get(cause) || { text: '', length: 0 };
    let head = before.text;
    if (offset === 0) {
      head = '';
      this._gapped.delete(cause);
    } else if (this._gapped.has(cause) || offset > before.length) {
      this._gapped.add(cause); // gluing it on after the gap would show a reply with text missing
      return null;
    } else if (offset !== before.length) {
      head = headCodePoints(before.text, offset); // an overlap: what it repeats is replaced
    }
    const content = head + text;
    this._partials.set(cause, { text: content, length: Math.min(offset, before.length) + codePoints(text) });
    return content;
  }
}
