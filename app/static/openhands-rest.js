/**
 * @file The REST half of the browser client (openhands-client.js is the entry point; import that).
 *
 * `OpenHandsError`, and `OpenHandsRest`, the base class of `OpenHandsClient`: the constructor's
 * options, the handlers (`on` / `off`), the REST helpers, and the requests themselves (JSON in and
 * out, the caller's key or the session cookie, safe retries of posted actions with one
 * `Idempotency-Key` per action, capped exponential backoff with full jitter, Retry-After).
 * It imports nothing.
 */

/** The events `on` / `off` know. */
export const EVENT_NAMES = Object.freeze([
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
 * The argument of an `error` handler.
 * @typedef {Object} ClientErrorEvent
 * @property {'sse'|'api'} type `sse`: trouble with the stream; `api`: a REST call failed
 * @property {*} error an `Event` of the EventSource, or an `OpenHandsError`
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
 * The OpenHandsError of an answer that is not a 2xx (`code`: the API's `error`, else `http_<status>`).
 * @param {number} status
 * @param {*} data the answer's parsed JSON body, or null
 * @param {Headers} headers
 * @returns {OpenHandsError}
 */
export function answerError(status, data, headers) {
  const isError = data !== null && typeof data === 'object';
  return new OpenHandsError(
    isError && typeof data.message === 'string' ? data.message : `HTTP error! status: ${status}`,
    {
      status,
      code: isError && typeof data.error === 'string' ? data.error : `http_${status}`,
      retryable: status >= 500 || status === 429,
      retryAfterMs: retryAfterMs(headers.get('Retry-After')),
    },
  );
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
 * A promise resolved after `ms` milliseconds.
 * @param {number} ms
 * @returns {Promise<void>}
 */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * What `OpenHandsClient` is built on: REST calls with the caller's key (or the session cookie alone).
 */
export class OpenHandsRest {
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
    /** @type {?string} */
    this.conversationId = null;
    /** @type {Object<string, Function[]>} handlers by event name */
    this.eventHandlers = Object.fromEntries(EVENT_NAMES.map((name) => [name, []]));
    const { minRetryMs = 500, maxRetryMs = 30000, sendAttempts = 5 } = options || {};
    /** @type {{minRetryMs: number, maxRetryMs: number, sendAttempts: number}} */
    this.options = {
      minRetryMs: Math.max(1, Number(minRetryMs) || 500),
      maxRetryMs: Math.max(1, Number(maxRetryMs) || 30000),
      sendAttempts: Math.max(1, Math.floor(Number(sendAttempts) || 5)),
    };
    this.options.maxRetryMs = Math.max(this.options.maxRetryMs, this.options.minRetryMs);
    /** @private whether a Bearer request succeeded (so the session cookie is set) */
    this._cookieSet = false;
  }

  // ---- REST ----------------------------------------------------------------------------------

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

  // ---- handlers ------------------------------------------------------------------------------

  /**
   * Add a handler (events: message, connection, state, agent_state, delta, history_truncated,
   * error, close); unknown names are ignored.
   * @param {string} event
   * @param {Function} handler
   * @returns {this} the client, for chaining
   */
  on(event, handler) {
    if (this.eventHandlers[event] && typeof handler === 'function') this.eventHandlers[event].push(handler);
    return this;
  }

  /**
   * Remove a handler.
   * @param {string} event
   * @param {Function} handler
   * @returns {this} the client, for chaining
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
    throw answerError(response.status, data, response.headers);
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
}
