/**
 * @file The browser client of the OpenHands REST + SSE API (the wire contract is API.md).
 *
 * It keeps the public API of the product document's `OpenHandsClient` (constructor, properties,
 * `createConversation`, `connect`, `sendAction`, `sendUserMessage`, `disconnect`, `on`, `off`, and
 * the `message` / `connection` / `error` / `close` events), and adds what a real page needs: every
 * stored event exactly once and in id order across reconnects, reconnection when the browser's
 * EventSource gives up, safe retries of posted actions (one `Idempotency-Key` per action), live
 * reply deltas rebuilt into the reply so far, the agent's state, `stop()`, and REST helpers.
 *
 * An ES module, the entry point: the class and its stream (reconnection, delivery once and in order)
 * are here; the REST half is in openhands-rest.js and the live replies in openhands-replies.js,
 * imported by relative paths (so any base path works). It also sets `globalThis.OpenHandsClient` (and
 * `globalThis.OpenHandsError`) when not already set, so a classic script placed after
 * `<script type="module" src="/static/openhands-client.js">` (deferred) can use it.
 */

import { OpenHandsError, OpenHandsRest } from './openhands-rest.js';
import { LiveReplies } from './openhands-replies.js';

export { OpenHandsError };

/** @typedef {import('./openhands-rest.js').ConversationEvent} ConversationEvent */
/** @typedef {import('./openhands-rest.js').ClientErrorEvent} ClientErrorEvent */
/** @typedef {import('./openhands-rest.js').ClientOptions} ClientOptions */
/** @typedef {import('./openhands-replies.js').ReplyDelta} ReplyDelta */

/** The first message of a conversation when none is given (the product document's). */
const DEFAULT_INITIAL_MESSAGE =
  'Check whether there is any incorrect information in the README.md file and send me updates';

/**
 * The data of the server's `connection` event, with `type: 'sse'` first (the product document's
 * shape: the server's own `type`, `connection_established`, follows and wins).
 * @typedef {Object} ConnectionInfo
 * @property {string} type
 * @property {string} connection_id
 * @property {string} conversation_id
 * @property {number} latest_event_id the id the stream resumes after
 * @property {string[]} providers_set
 * @property {?string} agent_state
 */

/** @typedef {'idle'|'connecting'|'open'|'reconnecting'|'closed'} ConnectionState */

/**
 * The argument of a `state` handler.
 * @typedef {Object} StateChange
 * @property {ConnectionState} state the new state
 * @property {ConnectionState} previous
 * @property {number} attempt reconnection attempts since the stream was last open (0 when open)
 * @property {?number} delayMs when the client itself reopens the stream: in how long; null when
 *   the browser's EventSource is reconnecting by itself (after the server's `retry:` delay)
 */

/**
 * @typedef {Object} HistoryTruncated
 * @property {number} earliest_event_id the oldest event still kept; delivery goes on from it
 */

/**
 * @typedef {Object} CloseInfo
 * @property {'disconnect'|'not_found'|'unauthorized'} reason
 */

/**
 * Whether `value` is an integer >= `min`.
 * @param {*} value
 * @param {number} min
 * @returns {boolean}
 */
function isInt(value, min) {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= min;
}

/**
 * The client: REST calls with the caller's key (or the session cookie alone), and one SSE stream.
 */
export class OpenHandsClient extends OpenHandsRest {
  /**
   * @param {?string} apiKey an API key sent as `Authorization: Bearer`; null or '' sends none (the
   *   session cookie alone authenticates)
   * @param {string} [baseUrl=''] the server's origin ('' for the page's own)
   * @param {ClientOptions} [options]
   */
  constructor(apiKey, baseUrl = '', options = {}) {
    super(apiKey, baseUrl, options);
    /** @type {?EventSource} the stream's EventSource, while one is open or opening */
    this.eventSource = null;
    /** @type {boolean} true from connect() until the client closes */
    this.connected = false;
    /** @type {ConnectionState} */
    this.state = 'idle';
    /** @type {number} the id of the last event delivered (-1: none yet) */
    this.lastEventId = -1;
    /** @type {?string} the agent's state as last seen (running, awaiting_user_input, stopped, error) */
    this.agentState = null;
    /** @private the conversation whose lastEventId we hold */
    this._streamConversation = null;
    /** @private */
    this._providers = 'github';
    /** @private bumped whenever the stream is replaced or closed: stale callbacks see another value */
    this._generation = 0;
    /** @private */
    this._timer = null;
    /** @private */
    this._attempt = 0;
    /** @private the replies being streamed, rebuilt from their deltas */
    this._replies = new LiveReplies();
  }

  // ---- REST (the other calls are OpenHandsRest's) -------------------------------------------

  /**
   * Create a conversation and connect to its stream.
   * @param {string} [repository] `owner/name`; omitted when empty
   * @param {string} [initialMessage=''] event 0 of the conversation ('' : the default text)
   * @returns {Promise<{status: string, conversation_id: string}>}
   * @throws {OpenHandsError}
   */
  async createConversation(repository, initialMessage = '') {
    const body = { initial_user_msg: initialMessage || DEFAULT_INITIAL_MESSAGE };
    if (repository) body.repository = repository;
    const data = await this._api(async () => {
      const answer = await this._request('POST', '/api/conversations', { body });
      if (!answer.conversation_id) {
        throw new OpenHandsError('No conversation_id received', { status: 200, code: 'bad_response' });
      }
      return answer;
    });
    this.conversationId = data.conversation_id;
    await this.connect();
    return data;
  }

  // ---- the stream ----------------------------------------------------------------------------

  /**
   * Open the conversation's stream (replacing any open one). Connecting to another conversation
   * starts from `latestEventId`; the same one again resumes from what was already delivered.
   * @param {?string} [conversationId=null] null: the current one
   * @param {number} [latestEventId=-1] the last event id the caller has (-1: from the beginning)
   * @param {string[]|string} [providersSet=['github']]
   * @returns {Promise<OpenHandsClient>}
   */
  async connect(conversationId = null, latestEventId = -1, providersSet = ['github']) {
    if (conversationId) this.conversationId = conversationId;
    if (!this.conversationId) {
      throw new OpenHandsError('No conversation ID provided', { code: 'no_conversation' });
    }
    const start = isInt(Number(latestEventId), -1) ? Number(latestEventId) : -1;
    if (this.conversationId !== this._streamConversation) {
      this._streamConversation = this.conversationId;
      this.lastEventId = start;
      this.agentState = null;
      this._replies.clear();
    } else {
      this.lastEventId = Math.max(this.lastEventId, start);
    }
    this._providers = Array.isArray(providersSet) ? providersSet.join(',') : String(providersSet || '');
    this._stopStream();
    const generation = this._generation;
    this._attempt = 0;
    this.connected = true;
    this._setState('connecting');
    if (this.apiKey && !this._cookieSet) {
      // An EventSource sends no header: a Bearer request first, so the session cookie is there.
      const outcome = await this._probe();
      if (generation !== this._generation) return this;
      if (outcome.close) {
        this._close(outcome.close);
        return this;
      }
    }
    this._openStream(generation);
    return this;
  }

  /** Close the stream for good (state `closed`, a `close` event with reason `disconnect`). */
  disconnect() {
    this._close('disconnect');
  }

  // ---- internals -----------------------------------------------------------------------------

  /**
   * Ask the server about the conversation: `{close: reason}` when the stream must not be retried.
   * @private
   * @returns {Promise<{close?: string, retryAfterMs?: number}>}
   */
  async _probe() {
    try {
      await this._fetchOnce('GET', this._conversationPath(this.conversationId), { headers: {} });
      return {};
    } catch (error) {
      if (error.status === 404) return { close: 'not_found' };
      if (error.status === 401) return { close: 'unauthorized' };
      return { retryAfterMs: error.retryAfterMs || 0 };
    }
  }

  /**
   * Open an EventSource resuming after lastEventId.
   * @private
   * @param {number} generation
   */
  _openStream(generation) {
    const params = new URLSearchParams({ latest_event_id: String(this.lastEventId) });
    if (this._providers) params.set('providers_set', this._providers);
    const url = `${this.baseUrl}/api/sse/conversations/${encodeURIComponent(this.conversationId)}/events?${params}`;
    const source = new EventSource(url, { withCredentials: true });
    this.eventSource = source;
    const current = () => generation === this._generation && source === this.eventSource;
    source.onmessage = (event) => {
      if (current()) this._onStoredEvent(event.data);
    };
    source.addEventListener('connection', (event) => {
      if (current()) this._onConnection(event.data);
    });
    source.addEventListener('agent_message_delta', (event) => {
      if (current()) this._onDelta(event.data);
    });
    source.addEventListener('history_truncated', (event) => {
      if (!current()) return;
      const data = this._parse(event.data, 'history_truncated');
      if (data && isInt(data.earliest_event_id, 0)) {
        this._triggerHandlers('history_truncated', { earliest_event_id: data.earliest_event_id });
      }
    });
    source.onerror = (error) => {
      if (!current()) return;
      this._triggerHandlers('error', { type: 'sse', error });
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (a non-200 answer or a wrong content type): we take over.
        source.close();
        this.eventSource = null;
        this._scheduleReopen(generation, 0);
      } else {
        // The browser reconnects by itself, with Last-Event-ID.
        this._attempt += 1;
        this._setState('reconnecting', null);
      }
    };
  }

  /**
   * After backoff, ask the server why the stream failed; close for good or open a new stream.
   * @private
   * @param {number} generation
   * @param {number} atLeastMs what a Retry-After asked for
   */
  _scheduleReopen(generation, atLeastMs) {
    const delayMs = this._backoff(this._attempt, atLeastMs);
    this._attempt += 1;
    this._setState('reconnecting', delayMs);
    this._timer = setTimeout(async () => {
      this._timer = null;
      if (generation !== this._generation) return;
      const outcome = await this._probe();
      if (generation !== this._generation) return;
      if (outcome.close) {
        this._close(outcome.close);
      } else if (outcome.retryAfterMs !== undefined) {
        this._scheduleReopen(generation, outcome.retryAfterMs);
      } else {
        this._openStream(generation);
      }
    }, delayMs);
  }

  /**
   * Parse an SSE data field as JSON; null (logged, and emitted as an `sse` error) when it is not.
   * @private
   * @param {string} raw
   * @param {string} what
   * @returns {*}
   */
  _parse(raw, what) {
    try {
      return JSON.parse(raw);
    } catch (error) {
      console.error(`Error parsing SSE ${what}:`, error);
      this._triggerHandlers('error', { type: 'sse', error });
      return null;
    }
  }

  /**
   * The server's `connection` event: the stream is open.
   * @private
   * @param {string} raw
   */
  _onConnection(raw) {
    const data = this._parse(raw, 'connection event');
    if (!data || typeof data !== 'object') return;
    this._attempt = 0;
    this._setState('open', null);
    this._triggerHandlers('connection', { type: 'sse', ...data });
    if (typeof data.agent_state === 'string') this._setAgentState(data.agent_state);
  }

  /**
   * A stored event: delivered once, in id order.
   * @private
   * @param {string} raw
   */
  _onStoredEvent(raw) {
    const event = this._parse(raw, 'message');
    if (!event || typeof event !== 'object') return;
    if (isInt(event.id, 0)) {
      if (event.id <= this.lastEventId) return; // already delivered (a replay after a reconnect)
      this.lastEventId = event.id;
    }
    const cause = isInt(event.cause, 0) ? event.cause : null;
    let agentState = null;
    if (event.type === 'agent_message' && cause !== null) {
      this._replies.stored(cause);
    } else if (event.type === 'agent_state_changed' && typeof event.agent_state === 'string') {
      agentState = event.agent_state;
      if (agentState !== 'running') this._replies.ended(cause);
    }
    this._triggerHandlers('message', event);
    if (agentState !== null) this._setAgentState(agentState);
  }

  /**
   * A live reply bit: rebuild the reply so far for its cause.
   * @private
   * @param {string} raw
   */
  _onDelta(raw) {
    const data = this._parse(raw, 'agent_message_delta');
    if (!data || !isInt(data.cause, 0) || !isInt(data.offset, 0) || typeof data.text !== 'string') return;
    const { cause, offset, text } = data;
    const content = this._replies.apply(cause, offset, text);
    if (content !== null) this._triggerHandlers('delta', { cause, offset, text, content });
  }

  /**
   * @private
   * @param {string} agentState
   */
  _setAgentState(agentState) {
    if (agentState === this.agentState) return;
    this.agentState = agentState;
    this._triggerHandlers('agent_state', agentState);
  }

  /**
   * @private
   * @param {ConnectionState} state
   * @param {?number} [delayMs=null]
   */
  _setState(state, delayMs = null) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this._triggerHandlers('state', { state, previous, attempt: this._attempt, delayMs });
  }

  /**
   * Close the EventSource and cancel any pending reopen; callbacks of the old stream are ignored.
   * @private
   */
  _stopStream() {
    this._generation += 1;
    if (this._timer !== null) {
      clearTimeout(this._timer);
      this._timer = null;
    }
    if (this.eventSource) {
      this.eventSource.close();
      this.eventSource = null;
    }
  }

  /**
   * Stop for good and say why (once).
   * @private
   * @param {'disconnect'|'not_found'|'unauthorized'} reason
   */
  _close(reason) {
    this._stopStream();
    this.connected = false;
    if (this.state === 'closed') return;
    this._setState('closed', null);
    this._triggerHandlers('close', { reason });
  }
}

export default OpenHandsClient;

if (!globalThis.OpenHandsClient) globalThis.OpenHandsClient = OpenHandsClient;
if (!globalThis.OpenHandsError) globalThis.OpenHandsError = OpenHandsError;
