// The conversation view: one OpenHandsClient per open conversation, its events rendered once each
// (by id), the live reply growing from deltas, the composer and the Stop button.

import {OpenHandsClient} from './openhands-client.js';
import {$, el, errorText} from './app-dom.js';
import {
  attachObservation, eventKind, isAgentEvent, markInterrupted, renderEvent, setStreamingText, streamingRow,
  truncatedNote,
} from './app-render.js';

/** How close to the bottom (px) still counts as "at the bottom": the view then follows new events. */
const FOLLOW_SLACK = 48;

/**
 * The open conversation.
 * Callbacks: onConnection(state), onAgentState(state|null), onClose(reason), onNotice(text), onUnauthorized().
 */
export class ConversationView {
  /**
   * @param {{onConnection: Function, onAgentState: Function, onClose: Function, onNotice: Function,
   *   onUnauthorized: Function}} hooks
   */
  constructor(hooks) {
    this.hooks = hooks;
    this.log = $('#event-log');
    this.input = /** @type {HTMLTextAreaElement} */ ($('#message'));
    this.stopButton = /** @type {HTMLButtonElement} */ ($('#stop'));
    this.jump = $('#jump');
    this.client = null;
    this.conversationId = null;
    this.follow = true;
    this.autoTop = 0; // where scrollToEnd last put the log
    this.sending = null; // the client a send is in flight on: Enter (or Send) does nothing until it is over
    this.resetState();
    this.bindControls();
  }

  /** Forget everything shown (a new conversation, or none). */
  resetState() {
    this.shown = new Set(); // event ids on the page: the stream's replay never shows one twice
    this.actions = new Map(); // agent_action id -> its row, where its observation goes
    this.streaming = new Map(); // cause -> the bubble growing from deltas
    // Causes whose stored agent_message closed the bubble: their deltas are late bits of it, until one at
    // offset 0 starts another reply of the same run.
    this.closedReplies = new Set();
    this.agentState = null;
    this.pending = null; // {text, key}: the message being sent, with its Idempotency-Key until it is stored
  }

  /** Wire the composer, Stop and the scroll-follow logic (once: the elements are the page's). */
  bindControls() {
    $('#composer').addEventListener('submit', (event) => {
      event.preventDefault();
      this.send();
    });
    this.input.addEventListener('keydown', (event) => {
      // Enter sends, Shift+Enter is a new line; not while an IME is composing a character.
      if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    this.stopButton.addEventListener('click', () => this.stop());
    this.log.addEventListener('scroll', () => {
      this.follow = this.nearBottom();
      if (this.follow) this.jump.hidden = true;
    });
    this.jump.addEventListener('click', () => {
      this.follow = true;
      this.scrollToEnd();
      this.input.focus();
    });
  }

  /**
   * Show a conversation: a fresh client whose stream replays the whole history, then goes on live.
   * @param {string} conversationId
   */
  async open(conversationId) {
    if (this.conversationId === conversationId && this.client) return;
    this.close();
    this.conversationId = conversationId;
    this.log.replaceChildren();
    this.follow = true;
    this.jump.hidden = true;
    this.setAgentState(null);
    const client = new OpenHandsClient(null); // the session cookie alone authenticates
    this.client = client;
    // The agent's state: the connection event's (the current one), then each agent_state_changed of the
    // agent's replayed or live; a user's posted one changes nothing. Only a stored event ends a live reply.
    client.on('message', (event) => this.current(client) && this.addEvent(event))
      .on('delta', (delta) => this.current(client) && this.showDelta(delta))
      .on('state', (change) => this.current(client) && this.hooks.onConnection(change.state))
      .on('connection', (info) => this.current(client) && info.agent_state && this.setAgentState(info.agent_state))
      .on('history_truncated', (info) => this.current(client) && this.append(truncatedNote(info.earliest_event_id)))
      .on('close', (info) => this.current(client) && this.closed(info.reason));
    this.hooks.onConnection('connecting');
    try {
      await client.connect(conversationId, -1);
    } catch (error) {
      if (this.current(client)) this.hooks.onNotice(`Could not open the conversation: ${errorText(error)}`);
    }
  }

  /** Whether `client` is still the one this view shows (events of a replaced client are dropped). */
  current(client) {
    return this.client === client;
  }

  /** Leave the conversation: its stream closes for good. */
  close() {
    const client = this.client;
    this.client = null;
    this.conversationId = null;
    this.resetState();
    if (client) client.disconnect();
    this.stopButton.hidden = true;
    this.hooks.onConnection('idle');
    this.hooks.onAgentState(null);
  }

  /** The stream ended for good: say why (the app routes on not_found / unauthorized). */
  closed(reason) {
    this.client = null;
    this.hooks.onConnection('closed');
    this.hooks.onClose(reason);
  }

  /**
   * Render one stored event, once, in id order.
   * @param {{id: number, type?: string}} event
   */
  addEvent(event) {
    if (typeof event.id !== 'number' || this.shown.has(event.id)) return;
    this.shown.add(event.id);
    const kind = eventKind(event);
    const own = isAgentEvent(event); // the agent's (its environment's), not a user's event of its type
    const action = kind === 'observation' && own ? this.actions.get(event.action_id) : undefined;
    if (action) {
      this.keepFollowing(() => attachObservation(action, event));
      return;
    }
    const node = renderEvent(event);
    if (kind === 'agent_action' && own) this.actions.set(event.id, node);
    const growing = kind === 'agent_message' && own ? this.streaming.get(event.cause) : undefined;
    if (kind === 'agent_message' && own && event.cause !== undefined) {
      this.closedReplies.add(event.cause);
      this.streaming.delete(event.cause);
    }
    const state = kind === 'agent_state_changed' && own && typeof event.agent_state === 'string'
      ? event.agent_state : null;
    this.keepFollowing(() => {
      if (growing) growing.remove(); // the stored reply replaces the one grown from deltas
      this.insertOrdered(node, event.id);
      if (state && state !== 'running') this.interrupt(event.cause, state, node);
    });
    if (state) this.setAgentState(state);
  }

  /**
   * The run that answered `cause` ended (stopped, error...) with a reply still growing: it will not be
   * stored. Say so, and put it just before the note that ended the run.
   * @param {number|undefined} cause undefined (a note naming no cause): every growing reply
   * @param {string} state
   * @param {HTMLElement} ender the note's row
   */
  interrupt(cause, state, ender) {
    for (const [growingFor, node] of [...this.streaming]) {
      if (cause !== undefined && growingFor !== cause) continue;
      markInterrupted(node, state);
      this.log.insertBefore(node, ender);
      this.streaming.delete(growingFor);
    }
  }

  /**
   * Insert a stored event's row after the last row with a smaller id; rows still streaming stay last.
   * @param {HTMLElement} node
   * @param {number} id
   */
  insertOrdered(node, id) {
    let before = null;
    for (let child = this.log.lastElementChild; child; child = child.previousElementSibling) {
      if (child.classList.contains('row-streaming')) {
        before = child;
        continue;
      }
      const childId = Number(child.getAttribute('data-event-id'));
      if (child.hasAttribute('data-event-id') && childId > id) {
        before = child;
        continue;
      }
      break;
    }
    this.log.insertBefore(node, before);
  }

  /**
   * A live delta: the reply so far for its cause (the client rebuilds `content` from offsets).
   * @param {{cause: number, offset: number, content: string}} delta
   */
  showDelta(delta) {
    if (this.closedReplies.has(delta.cause)) {
      if (delta.offset !== 0) return; // a late bit of the reply already stored
      this.closedReplies.delete(delta.cause); // another reply of the same run
    }
    let node = this.streaming.get(delta.cause);
    this.keepFollowing(() => {
      if (!node) {
        node = streamingRow(delta.cause);
        this.streaming.set(delta.cause, node);
        this.log.append(node);
      }
      setStreamingText(node, delta.content);
    });
  }

  /**
   * The agent's state (the header, the Stop button). It never ends a growing reply by itself: the
   * connection event's state is the current one, and may come before the missed reply is replayed.
   * @param {?string} state
   */
  setAgentState(state) {
    if (state === this.agentState) return;
    this.agentState = state;
    this.stopButton.hidden = state !== 'running';
    this.hooks.onAgentState(state);
  }

  /**
   * Send what the message box holds (not blank), once at a time; the box is cleared once the server
   * took it. The text keeps its Idempotency-Key until it is stored: sent again after a failure (whose
   * request may have landed), it is still one event.
   */
  async send() {
    const text = this.input.value;
    const client = this.client;
    if (!client || this.sending === client || !text.trim()) return;
    if (!this.pending || this.pending.text !== text) this.pending = {text, key: randomKey()};
    const pending = this.pending;
    this.sending = client;
    const sendButton = /** @type {HTMLButtonElement} */ ($('#send'));
    sendButton.disabled = true;
    try {
      await client.sendAction({type: 'user_message', content: text}, {idempotencyKey: pending.key});
      if (this.pending === pending) this.pending = null;
      if (!this.current(client)) return;
      if (this.input.value === text) this.input.value = '';
      this.follow = true;
      this.scrollToEnd();
    } catch (error) {
      if (error && error.status === 401) this.hooks.onUnauthorized();
      else if (this.current(client)) this.hooks.onNotice(`The message was not sent: ${errorText(error)}`);
    } finally {
      if (this.sending === client) this.sending = null;
      sendButton.disabled = Boolean(this.sending) && this.sending === this.client; // another one's send
      if (this.current(client)) this.input.focus();
    }
  }

  /** Ask the agent to stop its run (the state indicator shows when it has). */
  async stop() {
    if (!this.client) return;
    this.stopButton.disabled = true;
    try {
      await this.client.stop();
    } catch (error) {
      if (error && error.status === 401) this.hooks.onUnauthorized();
      else this.hooks.onNotice(`Stop failed: ${errorText(error)}`);
    } finally {
      this.stopButton.disabled = false;
    }
  }

  /** Append a row that is not a stored event (notes). */
  append(node) {
    this.keepFollowing(() => this.insertOrdered(node, Number.MAX_SAFE_INTEGER));
  }

  /** Change the log, then scroll to its end if the user was following; else offer a jump. */
  keepFollowing(change) {
    // The scroll event of a scroll made just now may not have come yet (it waits for a frame):
    // the position itself says whether the user left the end since we last scrolled there.
    if (this.follow && this.log.scrollTop < this.autoTop - FOLLOW_SLACK) this.follow = false;
    change();
    if (this.follow) this.scrollToEnd();
    else this.jump.hidden = false;
  }

  /** Whether the log is scrolled (nearly) to its end. */
  nearBottom() {
    return this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight <= FOLLOW_SLACK;
  }

  /** Scroll the log to its newest event. */
  scrollToEnd() {
    this.log.scrollTop = this.log.scrollHeight;
    this.autoTop = this.log.scrollTop;
  }
}

/**
 * A fresh random Idempotency-Key (128 bits, hex; crypto.randomUUID needs a secure context).
 * @returns {string}
 */
function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Build the view's static parts that depend on a conversation's metadata (title, repository). */
export function conversationHeading(meta) {
  $('#conv-title').textContent = meta && meta.title ? meta.title : 'Conversation';
  const parts = [];
  if (meta && meta.repository) parts.push(meta.repository);
  if (meta && meta.selected_branch) parts.push(`branch ${meta.selected_branch}`);
  $('#conv-sub').replaceChildren(...(parts.length ? [el('span', {text: parts.join(' · ')})] : []));
}
