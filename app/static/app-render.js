// How each conversation event looks: pure builders from an event object to DOM nodes. They only
// ever set text (see app-dom.js), so a message holding markup is shown as that markup, inert.

import {asJson, el, timeNode} from './app-dom.js';

/** The agent states of API.md, as the header's indicator names them. */
export const AGENT_STATE_LABELS = {
  running: 'Agent running',
  awaiting_user_input: 'Waiting for you',
  stopped: 'Agent stopped',
  error: 'Agent error',
};

/** The connection states of the client, as the header's indicator names them. */
export const CONNECTION_LABELS = {
  idle: 'Not connected',
  connecting: 'Connecting…',
  open: 'Live',
  reconnecting: 'Reconnecting…',
  closed: 'Disconnected',
};

/** What an agent_state_changed row says, by state. */
const STATE_ROW_TEXT = {
  running: 'Agent started working',
  awaiting_user_input: 'Agent is waiting for your next message',
  stopped: 'Agent stopped',
  error: 'Agent stopped with an error',
};

/**
 * The kind of an event: its `type`, or OpenHands' own `action` form for posted actions.
 * @param {object} event
 * @returns {string}
 */
export function eventKind(event) {
  return String(event.type || event.action || 'event');
}

/**
 * Whether an event is the runtime's own (the agent's, or its environment's observation), not one a
 * user posted with an agent's type: only those look like the agent's and drive its state.
 * @param {object} event
 * @returns {boolean}
 */
export function isAgentEvent(event) {
  if (eventKind(event) === 'observation') return event.source === 'environment' || event.source === 'agent';
  return event.source === 'agent';
}

/** The id'd wrapper every stored event gets: the log is ordered and de-duplicated by it. */
function row(event, className, children) {
  return el('div', {className: `row ${className}`,
    attrs: {'data-event-id': String(event.id), 'data-type': eventKind(event)}}, children);
}

/** A chat bubble (user or agent): who, when, the text with its line breaks kept by CSS. */
function bubble(who, label, text, time) {
  return el('div', {className: `bubble bubble-${who}`}, [
    el('div', {className: 'bubble-meta'}, [el('span', {className: 'who', text: label}), time]),
    el('div', {className: 'bubble-text', text}),
  ]);
}

/** The message text of a user_message, agent_message or OpenHands `message` action. */
function messageText(event) {
  if (typeof event.content === 'string') return event.content;
  if (event.args && typeof event.args.content === 'string') return event.args.content;
  return asJson(event);
}

/** A short one-line summary of an action's arguments (the path, command, url... it names). */
function argsSummary(args) {
  if (!args || typeof args !== 'object') return '';
  const values = Object.values(args).filter((v) => typeof v === 'string' || typeof v === 'number');
  const text = values.map(String).join(' ').replace(/\s+/g, ' ').trim();
  return text.length > 90 ? `${text.slice(0, 89)}…` : text;
}

/** An action's arguments as text: `name: value` lines when they are all plain values, else JSON. */
function argsText(args) {
  if (!args || typeof args !== 'object' || Array.isArray(args)) return asJson(args ?? {});
  const entries = Object.entries(args);
  if (!entries.length) return '(none)';
  const plain = entries.every(([, v]) => v === null || ['string', 'number', 'boolean'].includes(typeof v));
  return plain ? entries.map(([k, v]) => `${k}: ${v}`).join('\n') : asJson(args);
}

/** A labelled block of preformatted text inside an expanded row. */
function block(label, text) {
  return el('div', {className: 'block'}, [
    el('div', {className: 'block-label', text: label}),
    el('pre', {className: 'block-text', text}),
  ]);
}

/** An agent_action: a compact <details> row; its observation is added into it later. */
function actionRow(event) {
  const status = el('span', {className: 'action-status', text: 'running', attrs: {'data-status': 'pending'}});
  const summary = el('summary', {className: 'action-summary'}, [
    el('span', {className: 'action-icon', text: '›', attrs: {'aria-hidden': 'true'}}),
    el('span', {className: 'action-name', text: String(event.action || 'action')}),
    el('code', {className: 'action-args', text: argsSummary(event.args)}),
    status,
  ]);
  const details = el('details', {className: 'action'}, [summary, block('Arguments', argsText(event.args))]);
  return row(event, 'row-action', [details]);
}

/** An observation's body (also used on its own when its action is not on the page). */
function observationBlock(event) {
  const text = typeof event.content === 'string' ? event.content : asJson(event.content);
  const node = el('div', {className: 'observation',
    attrs: {'data-event-id': String(event.id), 'data-type': 'observation'}},
  [block(`Result${event.observation ? ` (${event.observation})` : ''}`, text || '(empty)')]);
  return node;
}

/**
 * Put an observation into its action's row; mark the action done.
 * @param {HTMLElement} actionNode the row made for the agent_action
 * @param {object} event the observation
 * @returns {HTMLElement} the node that holds the observation's id
 */
export function attachObservation(actionNode, event) {
  const node = observationBlock(event);
  actionNode.querySelector('details').append(node);
  const status = actionNode.querySelector('.action-status');
  status.textContent = 'done';
  status.setAttribute('data-status', 'done');
  return node;
}

/** A row for a thing without a dedicated look: its type and its JSON, as text. */
function genericRow(event, label) {
  const summary = el('summary', {className: 'action-summary'}, [
    el('span', {className: 'action-icon', text: '›', attrs: {'aria-hidden': 'true'}}),
    el('span', {className: 'action-name', text: label}),
    el('code', {className: 'action-args', text: event.source ? `from ${event.source}` : ''}),
  ]);
  return row(event, 'row-generic', [el('details', {className: 'action generic'}, [summary,
    block('Event', asJson(event))])]);
}

/** A centred one-line system note (state changes, stop requests). */
function noteRow(event, className, text) {
  return row(event, `row-note ${className}`, [el('p', {className: 'note'}, [text, ' ', timeNode(event.timestamp)])]);
}

/**
 * The row for one stored event (observations of an action on the page go through attachObservation).
 * @param {object} event a conversation event (id, type, source, ...)
 * @returns {HTMLElement}
 */
export function renderEvent(event) {
  const kind = eventKind(event);
  const time = timeNode(event.timestamp);
  const fromAgent = isAgentEvent(event);
  switch (kind) {
    case 'user_message':
    case 'agent_message':
    case 'message': {
      // A user's agent_message is the user's: only the agent speaks as the agent.
      const who = kind !== 'user_message' && fromAgent ? 'agent' : 'user';
      return row(event, `row-${who}`, [bubble(who, who === 'agent' ? 'Agent' : 'You', messageText(event), time)]);
    }
    case 'stop':
      return noteRow(event, 'note-stop', 'You asked the agent to stop');
    default:
      break;
  }
  if (!fromAgent) return genericRow(event, kind); // a user's event of an agent's type (or of an unknown one)
  switch (kind) {
    case 'agent_action':
      return actionRow(event);
    case 'observation': {
      const orphan = genericRow(event, `observation${event.observation ? `: ${event.observation}` : ''}`);
      orphan.querySelector('details').append(block('Result', typeof event.content === 'string'
        ? event.content : asJson(event.content)));
      return orphan;
    }
    case 'agent_state_changed': {
      const state = String(event.agent_state);
      return noteRow(event, `note-state note-${state}`, STATE_ROW_TEXT[state] || `Agent state: ${state}`);
    }
    case 'error':
      return row(event, 'row-error', [el('div', {className: 'error-box'}, [
        el('strong', {text: 'Error: '}), String(event.message ?? asJson(event)), ' ', time])]);
    default:
      return genericRow(event, kind);
  }
}

/**
 * The bubble of a reply still being written (from deltas): no event id, replaced by the stored message.
 * @param {number} cause the id of the user message it answers
 * @returns {HTMLElement}
 */
export function streamingRow(cause) {
  const node = el('div', {className: 'row row-agent row-streaming', attrs: {'data-cause': String(cause)}}, [
    bubble('agent', 'Agent', '', el('span', {className: 'typing', text: 'writing…'})),
  ]);
  node.querySelector('.bubble').setAttribute('aria-busy', 'true');
  return node;
}

/** Set the text of a streaming bubble. */
export function setStreamingText(node, text) {
  node.querySelector('.bubble-text').textContent = text;
}

/** A streaming bubble whose run ended without a stored reply (stopped, error): said so, kept. */
export function markInterrupted(node, state) {
  node.classList.remove('row-streaming');
  node.classList.add('row-interrupted');
  const bubbleNode = node.querySelector('.bubble');
  bubbleNode.removeAttribute('aria-busy');
  node.querySelector('.typing').textContent = state === 'error'
    ? 'cut short by an error; not saved' : 'stopped; this partial reply was not saved';
}

/** The note shown when the stream says the start of the history is gone (retention). */
export function truncatedNote(earliest) {
  return el('div', {className: 'row row-note'}, [
    el('p', {className: 'note', text: `Earlier events are no longer kept; this history starts at event ${earliest}.`}),
  ]);
}
