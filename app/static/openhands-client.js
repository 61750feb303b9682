/**
 * @file The browser client of the OpenHands REST + SSE API (the wire contract is API.md).
 *
 * It keeps the public API of the product document's `OpenHandsClient` (constructor, properties,
 * `createConversation`, `connect`, `sendAction`, `sendUserMessage`, `disconnect`, `on`, `off`, and
 * the `message` / `connection` / `error` / `close` events), and adds what a real page needs: every
 * stored event exactly once and in id order across reconnects, reconnection of its own (capped
 * exponential backoff with full jitter, after asking the stream's URL whether to go on), safe
 * retries of posted actions (one `Idempotency-Key` per action), live reply deltas rebuilt into the
 * reply so far, the agent's state, `stop()`, and REST helpers.
 *
 * An ES module, the entry point: the class and its stream (reconnection, delivery once and in order)
 * are here; the REST half is in openhands-rest.js, the probe of the stream's URL (and the types of
 * the stream's events) in openhands-stream.js, the live replies in openhands-replies.js, imported by
 * relative paths (so any base path works). It also sets `globalThis.OpenHandsClient` (and
 * `globalThis.OpenHandsError`) when not already set, so a classic script placed after
 * `<script type="module" src="/static/openhands-client.js">` (deferred) can use it.
 */

import { OpenHandsError, OpenHandsRest } from './openhands-rest.js';
import { LiveReplies } from './openhands-replies.js';
import { probeStream } from './openhands-stream.js';

export { OpenHandsError };

/** @typedef {import('./openhands-rest.js').ConversationEvent} ConversationEvent */
/** @typedef {import('./openhands-rest.js').ClientErrorEvent} ClientErrorEvent */
/** @typedef {import('./openhands-rest.js').ClientOptions} ClientOptions */
/** @typedef {import('./openhands-replies.js').ReplyDelta} ReplyDelta */
/** @typedef {import('./openhands-stream.js').ConnectionInfo} ConnectionInfo */
/** @typedef {import('./openhands-stream.js').StateChange} StateChange */
/** @typedef {import('./openhands-stream.js').ConnectionState} ConnectionState */
/** @typedef {import('./openhands-stream.js').HistoryTruncated} HistoryTruncated */
/** @typedef {import('./openhands-stream.js').CloseInfo} CloseInfo */

/** The first message of a conversation when none is given (the product document's). */
const DEFAULT_INITIAL_MESSAGE =
  'Check whether there is any incorrect information in the README.md file and send me updates';

/** A stream open this long (or one that delivered a new event) was healthy: backoff starts over. */
const STABLE_MS = 5000;

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
    /** @type {?EventSource} the stream's EventSource, while one is open or opening; null while the
     * client waits to reconnect or probes the stream's URL (so, with a key, right after a connect()
     * not awaited: the EventSource is made once the first Bearer request has set the cookie) */
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
    /** @private reopening attempts since a stream was last healthy */
    this._attempt = 0;
    /** @private when the stream's `connection` event came (null: not open) */
    this._openedAt = null;
    /** @private whether the open stream delivered a new stored event */
    this._delivered = false;
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
   * Open the conversation's stream (replacing any open one). With `latestEventId` given, delivery
   * starts after it (-1: the whole history again, even on the conversation already connected);
   * without it, another conversation starts from the beginning and the same one again resumes
   * after what was already delivered (as the client's own reconnects do).
   *
   * With a key and no session cookie yet, the stream's URL is asked first (a Bearer request sets
   * the cookie an EventSource needs): until then `eventSource` is null, so await the call to use it.
   * A stream that can never work (`400`, `401`, `403`, `404`) closes the client; anything else
   * (`429`, `5xx`, no answer) is retried after backoff.
   * @param {?string} [conversationId=null] null: the current one
   * @param {?number} [latestEventId] the last event id the caller has (-1: from the beginning)
   * @param {string[]|string} [providersSet=['github']]
   * @returns {Promise<OpenHandsClient>}
   */
  async connect(conversationId = null, latestEventId = undefined, providersSet = ['github']) {
    if (conversationId) this.conversationId = conversationId;
    if (!this.conversationId) {
      throw new OpenHandsError('No conversation ID provided', { code: 'no_conversation' });
    }
    const given = latestEventId !== undefined && latestEventId !== null;
    const start = given && isInt(Number(latestEventId), -1) ? Number(latestEventId) : -1;
    if (this.conversationId !== this._streamConversation || given) {
      if (this.conversationId !== this._streamConversation) this.agentState = null;
      this._streamConversation = this.conversationId;
      this.lastEventId = start;
      this._replies.clear();
    }
    this._providers = Array.isArray(providersSet) ? providersSet.join(',') : String(providersSet || '');
    this._stopStream();
    const generation = this._generation;
    this._attempt = 0;
    this.connected = true;
    this._setState('connecting');
    if (this.apiKey && !this._cookieSet) {
      // An EventSource sends no header: a Bearer request first, so the session cookie is there.
      await this._probeThenOpen(generation);
    } else {
      this._openStream(generation);
    }
    return this;
  }

  /** Close the stream for good (state `closed`, a `close` event with reason `disconnect`). */
  disconnect() {
    this._close('disconnect');
  }

  // ---- internals -----------------------------------------------------------------------------

  /**
   * The stream's URL, resuming after lastEventId.
   * @private
   * @returns {string}
   */
  _streamUrl() {
    const params = new URLSearchParams({ latest_event_id: String(this.lastEventId) });
    if (this._providers) params.set('providers_set', this._providers);
    return `${this.baseUrl}/api/sse/conversations/${encodeURIComponent(this.conversationId)}/events?${params}`;
  }

  /**
   * Ask the stream's URL what an EventSource would get (see openhands-stream.js), then open one,
   * close for good, or wait and try again.
   * @private
   * @param {number} generation
   */
  async _probeThenOpen(generation) {
    const outcome = await probeStream(this._streamUrl(), this.apiKey);
    if (generation !== this._generation) return;
    if (outcome.bearerOk) this._cookieSet = true;
    if (outcome.ok) {
      this._openStream(generation);
    } else if (outcome.close) {
      this._close(outcome.close, outcome.error);
    } else {
      this._scheduleReopen(generation, outcome.retryAfterMs);
    }
  }

  /**
   * Open an EventSource resuming after lastEventId.
   * @private
   * @param {number} generation
   */
  _openStream(generation) {
    const source = new EventSource(this._streamUrl(), { withCredentials: true });
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
      if (!current()) return; // a handler disconnected or connected again
      // Whether the browser gave up (CLOSED: a non-200 answer) or would reconnect by itself
      // (CONNECTING: every `retry:` ms, in step with every other tab, whatever the answer), the
      // client takes over: backoff with jitter, the stream's URL asked, then a new EventSource.
      source.close();
      this.eventSource = null;
      const healthy = this._openedAt !== null && (this._delivered || Date.now() - this._openedAt >= STABLE_MS);
      if (healthy) this._attempt = 0; // the first retry after a healthy stream is quick: [0, minRetryMs]
      this._openedAt = null;
      this._scheduleReopen(generation, 0);
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
    this._timer = setTimeout(() => {
      this._timer = null;
      if (generation === this._generation) this._probeThenOpen(generation);
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
    this._openedAt = Date.now();
    this._delivered = false;
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
      this._delivered = true;
    }
    const cause = isInt(event.cause, 0) ? event.cause : null;
    // Only the agent's events drive its state and replies: a user may post any `type` (API.md
    // reserves only id, timestamp and source), and what a user posts has `source: 'user'`.
    const fromAgent = event.source === 'agent';
    let agentState = null;
    if (fromAgent && event.type === 'agent_message' && cause !== null) {
      this._replies.stored(cause);
    } else if (fromAgent && event.type === 'agent_state_changed' && typeof event.agent_state === 'string') {
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
    if (state === this.state && !(state === 'reconnecting' && delayMs !== null)) return;
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
    this._openedAt = null;
  }

  /**
   * Stop for good and say why (once).
   * @private
   * @param {'disconnect'|'bad_request'|'unauthorized'|'forbidden'|'not_found'} reason
   * @param {OpenHandsError} [error] why the stream's URL refused: emitted as an `sse` error first
   */
  _close(reason, error) {
    this._stopStream();
    this.connected = false;
    if (this.state === 'closed') return;
    if (error) this._triggerHandlers('error', { type: 'sse', error });
    this._setState('closed', null);
    this._triggerHandlers('close', { reason });
  }
}

export default OpenHandsClient;

if (!globalThis.OpenHandsClient) globalThis.OpenHandsClient = OpenHandsClient;
if (!globalThis.OpenHandsError) globalThis.OpenHandsError = OpenHandsError;
