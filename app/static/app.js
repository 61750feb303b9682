// The web app's entry point: signing in and out, the hash router (#/ the list, #/c/<id> a
// conversation, so a reload keeps what is open), and the header's connection and agent indicators.

import {OpenHandsClient} from './openhands-client.js';
import {$, errorText, showOnly} from './app-dom.js';
import {AGENT_STATE_LABELS, CONNECTION_LABELS} from './app-render.js';
import {ConversationView, conversationHeading} from './app-conversation.js';
import {ListView, confirmDelete} from './app-list.js';

const GONE = 'That conversation does not exist (or was deleted).';
const BAD_LINK = 'That address is not a link to a conversation.';
const SESSION_ENDED = 'Your session ended; sign in again.';
/** What a conversation id looks like (the server makes them URL-safe base64: secrets.token_urlsafe). */
const CONVERSATION_ID = /^[A-Za-z0-9_-]{1,64}$/;
/** What the notice line says when the stream closes for good for one of these reasons. */
const CLOSE_NOTICES = {
  bad_request: 'The server refused to stream this conversation (a bad request); reload the page to try again.',
  forbidden: 'You are not allowed to see this conversation.',
};
const views = ['#view-loading', '#view-signin', '#view-list', '#view-conv'].map((s) => $(s));
const api = new OpenHandsClient(null); // REST only; the session cookie authenticates it
let signedIn = false;
let nextNotice = ''; // said once the hash change it comes with has been routed (a route change clears the line)

/** Say something on the notice line (errors the user should see); empty text hides it. */
function notice(text) {
  const line = $('#notice');
  line.textContent = text || '';
  line.hidden = !text;
}

/** The header's connection indicator (client 'state': connecting, open, reconnecting, closed; idle). */
function showConnection(state) {
  const pill = $('#conn-status');
  pill.setAttribute('data-state', state);
  pill.querySelector('.pill-text').textContent = CONNECTION_LABELS[state] || state;
}

/** The header's agent state indicator (null: no conversation open, or no agent ran yet). */
function showAgentState(state) {
  const pill = $('#agent-status');
  pill.hidden = !conversation.conversationId;
  pill.setAttribute('data-state', state || 'none');
  pill.querySelector('.pill-text').textContent = state ? AGENT_STATE_LABELS[state] || `Agent: ${state}` : 'Agent idle';
}

/** Back to the list, saying `message` there (a conversation that is gone, ...). */
function toList(message = '') {
  if (location.hash === '#/' || location.hash === '') {
    notice(message);
    route();
  } else {
    nextNotice = message;
    location.hash = '#/';
  }
}

const conversation = new ConversationView({
  onConnection: showConnection,
  onAgentState: showAgentState,
  onNotice: notice,
  onUnauthorized: () => signedOut(SESSION_ENDED),
  onClose: (reason) => {
    if (reason === 'unauthorized') signedOut(SESSION_ENDED);
    else if (reason === 'not_found') toList(GONE);
    else if (reason !== 'disconnect') {
      notice(CLOSE_NOTICES[reason] || `The conversation's stream closed (${reason}); reload the page to try again.`);
    }
  },
});

const list = new ListView(api, {
  onNotice: notice,
  onUnauthorized: () => signedOut(SESSION_ENDED),
  onCreated: (id) => {
    location.hash = `#/c/${encodeURIComponent(id)}`;
  },
});

/**
 * What the URL hash names: a conversation id (#/c/<id>), '' for a #/c/ link that holds no valid id
 * (it is never decoded: a valid id needs no escape), or null for the list.
 * @returns {?string}
 */
function routeId() {
  if (!location.hash.startsWith('#/c/')) return null;
  const id = location.hash.slice('#/c/'.length);
  return CONVERSATION_ID.test(id) ? id : '';
}

/** Show what the hash names (signed in only). */
async function route() {
  if (!signedIn) return;
  const id = routeId();
  if (id === '') {
    toList(BAD_LINK);
    return;
  }
  if (id) {
    await openConversation(id);
    return;
  }
  conversation.close();
  showOnly($('#view-list'), views);
  document.title = 'Conversations · OpenHands';
  await list.refresh();
}

/** Open one conversation: its heading from REST, its events from the stream. */
async function openConversation(id) {
  const sameOne = conversation.conversationId === id;
  showOnly($('#view-conv'), views);
  if (!sameOne) {
    conversationHeading(null);
    $('#message').focus();
  }
  const opening = conversation.open(id);
  showAgentState(conversation.agentState);
  try {
    const meta = await api.getConversation(id);
    if (conversation.conversationId === id) {
      conversationHeading(meta);
      document.title = `${meta.title || 'Conversation'} · OpenHands`;
    }
  } catch (error) {
    if (error && error.status === 401) signedOut(SESSION_ENDED);
    else if (error && error.status === 404) {
      if (conversation.conversationId === id) toList(GONE);
    } else notice(`Could not load the conversation: ${errorText(error)}`);
  }
  await opening;
}

/** Signed in as `userId`: the header shows it, the route decides the view. */
function signedInAs(userId) {
  signedIn = true;
  $('#user-name').textContent = userId;
  $('#account').hidden = false;
  route();
}

/** Signed out (or the cookie went stale): nothing of the user's stays on the page. */
function signedOut(message = '') {
  signedIn = false;
  conversation.close();
  $('#conv-list').replaceChildren();
  $('#event-log').replaceChildren();
  $('#account').hidden = true;
  $('#user-name').textContent = '';
  showOnly($('#view-signin'), views);
  document.title = 'Sign in · OpenHands';
  notice(message);
  $('#api-key').focus();
}

/**
 * Sign in with the pasted key: POST /api/session with it as Bearer; the server sets the session cookie.
 * The key leaves the input at once and is held by nothing once the request went.
 */
async function signIn(event) {
  event.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($('#api-key'));
  const failure = $('#signin-error');
  failure.hidden = true;
  const headers = {Authorization: `Bearer ${input.value.trim()}`};
  input.value = '';
  if (headers.Authorization === 'Bearer ') {
    showError(failure, 'Paste your API key first.', input);
    return;
  }
  const button = /** @type {HTMLButtonElement} */ ($('#signin-button'));
  button.disabled = true;
  try {
    const response = await fetch('/api/session', {method: 'POST', headers, credentials: 'same-origin'});
    delete headers.Authorization;
    const body = await response.json().catch(() => ({}));
    if (response.ok) {
      notice('');
      signedInAs(body.user_id);
    } else {
      showError(failure, response.status === 401 ? 'That key was not accepted.' : body.message || `HTTP ${response.status}`, input);
    }
  } catch {
    showError(failure, 'The server cannot be reached; try again.', input);
  } finally {
    delete headers.Authorization;
    button.disabled = false;
  }
}

/** An error under the sign-in field. */
function showError(node, text, field) {
  node.textContent = text;
  node.hidden = false;
  field.setAttribute('aria-describedby', node.id);
  field.focus();
}

/** Sign out: the server clears the cookie; the page shows sign-in. */
async function signOut() {
  try {
    await fetch('/api/session', {method: 'DELETE', credentials: 'same-origin'});
  } catch {
    // The page forgets the user anyway; a cookie the server did not clear expires with the key.
  }
  location.hash = '#/';
  signedOut('You are signed out.');
}

/** Delete the open conversation (after confirming), then back to the list. */
async function deleteOpen() {
  const id = conversation.conversationId;
  if (!id) return;
  if (!(await confirmDelete($('#conv-title').textContent || 'this conversation'))) return;
  try {
    await api.deleteConversation(id);
    conversation.close();
    toList();
  } catch (error) {
    notice(`Could not delete the conversation: ${errorText(error)}`);
  }
}

/** On load: is the session cookie still good? Then show the route, else sign-in. */
async function start() {
  $('#signin-form').addEventListener('submit', signIn);
  $('#sign-out').addEventListener('click', signOut);
  $('#conv-delete').addEventListener('click', deleteOpen);
  window.addEventListener('hashchange', () => {
    notice(nextNotice);
    nextNotice = '';
    route();
  });
  try {
    const response = await fetch('/api/session', {credentials: 'same-origin'});
    const body = await response.json().catch(() => ({}));
    if (response.ok) signedInAs(body.user_id);
    else signedOut(response.status === 401 ? '' : `The server answered ${response.status}; sign in to retry.`);
  } catch {
    signedOut('The server cannot be reached.');
  }
}

start();
