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
 * An ES module with no dependencies. It also sets `globalThis.OpenHandsClient` (and
 * `globalThis.OpenHandsError`) when not already set, so a classic script placed after
 * `<script type="module" src="/static/openhands-client.js">` (deferred) can use it.
 */

/** The first message of a conversation when none is given (the product document's). */
const DEFAULT_INITIAL_MESSAGE =
  'Check whether there is any incorrect information in the README.md file and send me updates';

/** The events `on` / `off` know. */
const EVENT_NAMES = Object.freeze([
  'message', 'error', 'connection', 'close', 'state', 'agent_state', 'delta', 'history_truncated',
]);

/**
 * A stored conversation event, as the stream and the REST listing carry it.
 * @typedef {Object} ConversationEvent
 * @property {number} id consecutive per conversation, from 0
 * @property {string} timestamp ISO 8601
 * @property {'user'|'agent'|'environment'} source
 * @property {string} type e.g. user_message, agent_message, agent_state_changed, agent_action, observation, error
 * @property {number} [cause] the id of the user event an agent's event answers
 * @property {string} [content]
 * @property {string} [agent_state] on agent_state_changed
 */

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

/**
 * @typedef {'idle'|'connecting'|'open'|'reconnecting'|'closed'} ConnectionState
 */

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
 * The argument of a `delta` handler: one live bit of an agent's reply.
 * @typedef {Object} ReplyDelta
 * @property {number} cause the user event the reply answers
 * @property {number} offset where `text` starts in the reply so far, in characters (code points)
 * @property {string} text
 * @property {string} content the reply so far, rebuilt from the deltas
 */

/**
 * @typedef {Object} HistoryTruncated
 * @property {number} earliest_event_id the oldest event still kept; delivery goes on from it
 */

/**
 * The argument of an `error` handler.
 * @typedef {Object} ClientErrorEvent
 * @property {'sse'|'api'} type `sse`: trouble with the stream; `api`: a REST call failed
 * @property {*} error an `Event` of the EventSource, or an `OpenHandsError`
 */

/**
 * @typedef {Object} CloseInfo
 * @property {'disconnect'|'not_found'|'unauthorized'} reason
 */

/**
 * @typedef {Object} ClientOptions
 * @property {number} [minRetryMs=500] first reconnection / retry delay bound
 * @property {number} [maxRetryMs=30000] the cap of that delay
 * @property {number} [sendAttempts=5] tries of one `sendAction` (and of the REST reads) at most
 */

/**
 * A failed API call: the API's JSON error (`code` is its `error` field), or a network error.
 */
export class OpenHandsError extends Error {
  /**
   * @param {string} message human-readable text
   * @param {{status?: number, code?: string, retryable?: boolean, retryAfterMs?: number, cause?: *}} [details]
   */
  constructor(message, { status = 0, code = 'error', retryable = false, retryAfterMs = 0, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    /** @type {string} */
    this.name = 'OpenHandsError';
    /** @type {number} the HTTP status; 0 when no answer came (network error) */
    this.status = status;
    /** @type {string} the API's machine code (`not_found`, `invalid_action`, ...), or `network_error`, `http_<status>`, `bad_response`, `no_conversation` */
    this.code = code;
    /** @type {boolean} whether trying again may succeed (network errors, 5xx, 429) */
    this.retryable = retryable;
    /** @type {number} what the answer's Retry-After asked for, in ms (0: nothing) */
    this.retryAfterMs = retryAfterMs;
  }
}

/**
 * Milliseconds a Retry-After header asks for (seconds or an HTTP date); 0 when absent or bad.
 * @param {?string} value
 * @returns {number}
 */
function retryAfterMs(value) {
  if (!value) return 0;
  const text = value.trim();
  if (/^\d+$/.test(text)) return Number(text) * 1000;
  const when = Date.parse(text);
  return Number.isNaN(when) ? 0 : Math.max(0, when - Date.now());
}

/**
 * A fresh random Idempotency-Key (128 bits, hex); works outside secure contexts too.
 * @returns {string}
 */
function randomKey() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

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
 * Whether `value` is an integer >= `min`.
 * @param {*} value
 * @param {number} min
 * @returns {boolean}
 */
function isInt(value, min) {
  return typeof value === 'number' && Number.isSafeInteger(value) && value >= min;
}

/**
 * A promise resolved after `ms` milliseconds.
 * @param {number} ms
 * @returns {Promise<void>}
 */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * The client: REST calls with the caller's key (or the session cookie alone), and one SSE stream.
 */
export class OpenHandsClient {
  /**
   * @param {?string} apiKey an API key sent as `Authorization: Bearer`; null or '' sends none (the
   *   session cookie alone authenticates)
   * @param {string} [baseUrl=''] the server's origin ('' for the page's own)
   * @param {ClientOptions} [options]
   */
  constructor(apiKey, baseUrl = '', options = {}) {
    /** @type {?string} */
    this.apiKey = apiKey;
    /** @type {string} */
    this.baseUrl = baseUrl || '';
    /** @type {?EventSource} the stream's EventSource, while one is open or opening */
    this.eventSource = null;
    /** @type {?string} */
    this.conversationId = null;
    /** @type {boolean} true from connect() until the client closes */
    this.connected = false;
    /** @type {Object<string, Function[]>} handlers by event name */
    this.eventHandlers = Object.fromEntries(EVENT_NAMES.map((name) => [name, []]));
    /** @type {ConnectionState} */
    this.state = 'idle';
    /** @type {number} the id of the last event delivered (-1: none yet) */
    this.lastEventId = -1;
    /** @type {?string} the agent's state as last seen (running, awaiting_user_input, stopped, error) */
    this.agentState = null;
    const { minRetryMs = 500, maxRetryMs = 30000, sendAttempts = 5 } = options || {};
    /** @type {{minRetryMs: number, maxRetryMs: number, sendAttempts: number}} */
    this.options = {
      minRetryMs: Math.max(1, Number(minRetryMs) || 500),
      maxRetryMs: Math.max(1, Number(maxRetryMs) || 30000),
      sendAttempts: Math.max(1, Math.floor(Number(sendAttempts) || 5)),
    };
    this.options.maxRetryMs = Math.max(this.options.maxRetryMs, this.options.minRetryMs);
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
    /** @private {Map<number, {text: string, length: number}>} replies so far, by cause */
    this._partials = new Map();
    /** @private {Set<number>} causes whose run ended: a late delta for them is dropped */
    this._finished = new Set();
    /** @private whether a Bearer request succeeded (so the session cookie is set) */
    this._cookieSet = false;
  }

  // ---- REST ----------------------------------------------------------------------------------

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

  /**
   * The caller's conversations, newest first.
   * @param {{limit?: number, pageId?: ?string}} [query]
   * @returns {Promise<{results: Object[], next_page_id: ?string}>}
   * @throws {OpenHandsError}
   */
  async listConversations({ limit, pageId } = {}) {
    const params = new URLSearchParams();
    if (limit !== undefined && limit !== null) params.set('limit', String(limit));
    if (pageId) params.set('page_id', pageId);
    const query = params.toString();
    return this._api(() => this._request('GET', `/api/conversations${query ? `?${query}` : ''}`,
      { attempts: this.options.sendAttempts }));
  }

  /**
   * One conversation (conversation_id, repository, title, created_at, last_event_id, agent_state, ...).
   * @param {string} [id=this.conversationId]
   * @returns {Promise<Object>}
   * @throws {OpenHandsError}
   */
  async getConversation(id = this.conversationId) {
    return this._api(() => this._request('GET', this._conversationPath(id), { attempts: this.options.sendAttempts }));
  }

  /**
   * Delete a conversation (its open streams end; the client connected to it closes with 'not_found').
   * @param {string} id
   * @returns {Promise<{status: string}>}
   * @throws {OpenHandsError}
   */
  async deleteConversation(id) {
    return this._api(() => this._request('DELETE', this._conversationPath(id)));
  }

  /**
   * A page of a conversation's stored events, from `startId` on.
   * @param {string} [id=this.conversationId]
   * @param {{startId?: number, limit?: number}} [query]
   * @returns {Promise<{events: ConversationEvent[], has_more: boolean}>}
   * @throws {OpenHandsError}
   */
  async getEvents(id = this.conversationId, { startId = 0, limit = 100 } = {}) {
    const params = new URLSearchParams({ start_id: String(startId), limit: String(limit) });
    return this._api(() => this._request('GET', `${this._conversationPath(id)}/events?${params}`,
      { attempts: this.options.sendAttempts }));
  }

  /**
   * Post an action to the connected conversation. Network errors, 5xx and 429 are retried with the
   * same Idempotency-Key (so the action is stored once), up to `sendAttempts` tries.
   * @param {Object} actionData e.g. `{type: 'user_message', content: 'hi'}`
   * @param {{idempotencyKey?: string}} [options] a key of the caller's; a fresh random one by default
   * @returns {Promise<{status: string, success: boolean, event_id: number}>}
   * @throws {OpenHandsError}
   */
  async sendAction(actionData, { idempotencyKey } = {}) {
    if (!this.conversationId) {
      throw new OpenHandsError('Not connected to a conversation', { code: 'no_conversation' });
    }
    const path = `${this._conversationPath(this.conversationId)}/events`;
    const headers = { 'Idempotency-Key': idempotencyKey || randomKey() };
    return this._api(() => this._request('POST', path, {
      body: actionData, headers, attempts: this.options.sendAttempts,
    }));
  }

  /**
   * Post a user message.
   * @param {string} text
   * @returns {Promise<{status: string, success: boolean, event_id: number}>}
   */
  async sendUserMessage(text) {
    return this.sendAction({ type: 'user_message', content: text });
  }

  /**
   * Ask the agent to stop its running run (the agent state becomes `stopped`).
   * @returns {Promise<{status: string, success: boolean, event_id: number}>}
   */
  async stop() {
    return this.sendAction({ type: 'stop' });
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
      this._partials.clear();
      this._finished.clear();
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

  /**
   * Close the stream for good (state `closed`, a `close` event with reason `disconnect`).
   */
  disconnect() {
    this._close('disconnect');
  }

  /**
   * Add a handler (events: message, connection, state, agent_state, delta, history_truncated,
   * error, close); unknown names are ignored.
   * @param {string} event
   * @param {Function} handler
   * @returns {OpenHandsClient}
   */
  on(event, handler) {
    if (this.eventHandlers[event] && typeof handler === 'function') this.eventHandlers[event].push(handler);
    return this;
  }

  /**
   * Remove a handler.
   * @param {string} event
   * @param {Function} handler
   * @returns {OpenHandsClient}
   */
  off(event, handler) {
    if (this.eventHandlers[event]) {
      this.eventHandlers[event] = this.eventHandlers[event].filter((h) => h !== handler);
    }
    return this;
  }

  /**
   * Call every handler of `event` with `data`; a throwing handler is logged, the others still run.
   * @param {string} event
   * @param {*} data
   */
  _triggerHandlers(event, data) {
    for (const handler of [...(this.eventHandlers[event] || [])]) {
      try {
        handler(data);
      } catch (e) {
        console.error(`Error in ${event} handler:`, e);
      }
    }
  }

  // ---- internals -----------------------------------------------------------------------------

  /**
   * @private
   * @param {?string} id
   * @returns {string}
   */
  _conversationPath(id) {
    if (!id) throw new OpenHandsError('No conversation ID provided', { code: 'no_conversation' });
    return `/api/conversations/${encodeURIComponent(id)}`;
  }

  /**
   * Run a REST call; a failure is emitted as `error` `{type: 'api', error}` and thrown again.
   * @private
   * @template T
   * @param {function(): Promise<T>} call
   * @returns {Promise<T>}
   */
  async _api(call) {
    try {
      return await call();
    } catch (error) {
      this._triggerHandlers('error', { type: 'api', error });
      throw error;
    }
  }

  /**
   * A request, tried up to `attempts` times while the failure is retryable.
   * @private
   * @param {string} method
   * @param {string} path
   * @param {{body?: *, headers?: Object<string, string>, attempts?: number}} [init]
   * @returns {Promise<Object>}
   */
  async _request(method, path, { body, headers = {}, attempts = 1 } = {}) {
    for (let attempt = 1; ; attempt += 1) {
      try {
        return await this._fetchOnce(method, path, { body, headers });
      } catch (error) {
        if (!(error instanceof OpenHandsError) || !error.retryable || attempt >= attempts) throw error;
        await sleep(this._backoff(attempt - 1, error.retryAfterMs));
      }
    }
  }

  /**
   * One request; the JSON answer, or an OpenHandsError.
   * @private
   * @param {string} method
   * @param {string} path
   * @param {{body?: *, headers?: Object<string, string>}} init
   * @returns {Promise<Object>}
   */
  async _fetchOnce(method, path, { body, headers }) {
    const init = { method, headers: { Accept: 'application/json', ...headers }, credentials: 'include', cache: 'no-store' };
    if (this.apiKey) init.headers.Authorization = `Bearer ${this.apiKey}`;
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    let text;
    try {
      response = await fetch(`${this.baseUrl}${path}`, init);
      text = await response.text();
    } catch (cause) {
      // No answer (or only part of one): the request may or may not have reached the server.
      throw new OpenHandsError(`Network error: ${(cause && cause.message) || cause}`,
        { code: 'network_error', retryable: true, cause });
    }
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = null;
    }
    if (response.ok) {
      if (data === null || typeof data !== 'object') {
        throw new OpenHandsError('The server answered without JSON', { status: response.status, code: 'bad_response' });
      }
      if (this.apiKey) this._cookieSet = true;
      return data;
    }
    const status = response.status;
    const isError = data !== null && typeof data === 'object';
    throw new OpenHandsError(
      isError && typeof data.message === 'string' ? data.message : `HTTP error! status: ${status}`,
      {
        status,
        code: isError && typeof data.error === 'string' ? data.error : `http_${status}`,
        retryable: status >= 500 || status === 429,
        retryAfterMs: retryAfterMs(response.headers.get('Retry-After')),
      },
    );
  }

  /**
   * Capped exponential backoff with full jitter, at least what Retry-After asked (within the cap).
   * @private
   * @param {number} attempt 0 for the first retry
   * @param {number} [atLeastMs=0]
   * @returns {number}
   */
  _backoff(attempt, atLeastMs = 0) {
    const { minRetryMs, maxRetryMs } = this.options;
    const ceiling = Math.min(maxRetryMs, minRetryMs * 2 ** Math.min(attempt, 30));
    return Math.round(Math.min(maxRetryMs, Math.max(Math.random() * ceiling, atLeastMs || 0)));
  }

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
      this._partials.delete(cause);
    } else if (event.type === 'agent_state_changed' && typeof event.agent_state === 'string') {
      agentState = event.agent_state;
      if (agentState !== 'running') {
        if (cause === null) {
          this._partials.clear();
        } else {
          this._partials.delete(cause);
          this._finished.add(cause);
        }
      }
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
    if (this._finished.has(cause)) return; // its run has ended: the stored events are the truth
    const before = this._partials.get(cause) || { text: '', length: 0 };
    let head = before.text;
    if (offset === 0) {
      head = '';
    } else if (offset !== before.length) {
      head = headCodePoints(before.text, offset);
    }
    const content = head + text;
    this._partials.set(cause, { text: content, length: Math.min(offset, before.length) + codePoints(text) });
    this._triggerHandlers('delta', { cause, offset, text, content });
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
