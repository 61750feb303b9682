/**
 * @file The stream's probe, and the types of the stream's events, of the browser client
 * (openhands-client.js is the entry point; import that).
 *
 * Before it opens an EventSource again, the client asks the stream's own URL what an EventSource
 * would get, with a `HEAD` request: the server answers it with the status a `GET` would get
 * (`400` for a bad `latest_event_id` or `providers_set`, `401`, `404`, `503` while Redis is down)
 * and opens no stream, so a probe never counts against `SSE_MAX_STREAMS_PER_USER`. Only when the
 * answer is a permanent failure is the URL asked again with a `GET`, for the API's JSON error
 * (a `HEAD` answer has no body); should that `GET` be answered `200` after all (the failure went
 * away meanwhile), it is aborted as soon as its status is known. It imports only openhands-rest.js.
 */

import { OpenHandsError, answerError } from './openhands-rest.js';

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
 * @property {number} attempt reconnection attempts since a stream was last healthy (open for 5 s,
 *   or delivering a new event); a stream that opens and ends at once does not start backoff over
 * @property {?number} delayMs on `reconnecting`: in how many ms the client reopens the stream
 *   (each new wait is a `state` event of its own, `previous` being `reconnecting` too); else null
 */

/**
 * @typedef {Object} HistoryTruncated
 * @property {number} earliest_event_id the oldest event still kept; delivery goes on from it
 */

/**
 * @typedef {Object} CloseInfo
 * @property {'disconnect'|'bad_request'|'unauthorized'|'forbidden'|'not_found'} reason `disconnect`:
 *   disconnect() was called; the others: the stream's URL answered 400 (or another permanent 4xx),
 *   401, 403 or 404 (an `error` `{type: 'sse', error: OpenHandsError}` with the server's code and
 *   message comes just before)
 */

/**
 * Why a stream answered `status` must not be retried: the `close` reason, or null when trying
 * again may succeed (no answer, `408`, `425`, `429`, `5xx`).
 * @param {number} status 0 when no answer came
 * @returns {?('bad_request'|'unauthorized'|'forbidden'|'not_found')}
 */
export function closeReason(status) {
  if (status === 401) return 'unauthorized';
  if (status === 403) return 'forbidden';
  if (status === 404 || status === 410) return 'not_found';
  if (status >= 400 && status < 500 && ![408, 425, 429].includes(status)) return 'bad_request';
  return null;
}

/**
 * One request to the stream's URL: null when it answers 2xx, else the failure.
 * @param {string} url
 * @param {'HEAD'|'GET'} method
 * @param {?string} bearer a key to send as `Authorization: Bearer` (null: the cookie alone, as an EventSource)
 * @returns {Promise<?OpenHandsError>}
 */
async function ask(url, method, bearer) {
  const controller = new AbortController();
  const headers = { Accept: 'text/event-stream' };
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  let response;
  try {
    response = await fetch(url, { method, headers, credentials: 'include', cache: 'no-store', signal: controller.signal });
  } catch (cause) {
    return new OpenHandsError(`Network error: ${(cause && cause.message) || cause}`,
      { code: 'network_error', retryable: true, cause });
  }
  if (response.ok) {
    controller.abort(); // a GET answered 200 is a stream: it is not read
    return null;
  }
  let data = null;
  if (method === 'GET') {
    try {
      data = JSON.parse(await response.text());
    } catch {
      data = null;
    }
  }
  return answerError(response.status, data, response.headers);
}

/**
 * Ask the stream's URL (HEAD; GET for the error's text when the failure is permanent).
 * @param {string} url
 * @param {?string} bearer
 * @returns {Promise<?OpenHandsError>}
 */
async function check(url, bearer) {
  const failure = await ask(url, 'HEAD', bearer);
  if (failure === null || closeReason(failure.status) === null) return failure;
  return ask(url, 'GET', bearer);
}

/**
 * What an EventSource opened on `url` now would get. With a key, a Bearer request first (which
 * sets the session cookie an EventSource needs, and says whether the key may read the stream),
 * then one with the cookie alone, as the EventSource sends it (a cookie the browser does not
 * send or keep is found here, and not by a stream failing forever).
 * @param {string} url the stream's URL, with its query
 * @param {?string} apiKey
 * @returns {Promise<{ok?: boolean, bearerOk?: boolean, close?: string, error?: OpenHandsError, retryAfterMs?: number}>}
 *   `ok`: open the stream; `close` (with the `error`): stop for good; else try again after at least `retryAfterMs`
 */
export async function probeStream(url, apiKey) {
  let bearerOk = false;
  let failure = null;
  if (apiKey) {
    failure = await check(url, apiKey);
    bearerOk = failure === null;
  }
  if (failure === null) failure = await check(url, null);
  if (failure === null) return { ok: true, bearerOk };
  const close = closeReason(failure.status);
  if (close !== null) return { close, error: failure, bearerOk };
  return { retryAfterMs: failure.retryAfterMs || 0, error: failure, bearerOk };
}
