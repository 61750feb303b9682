// The list view: the user's conversations (newest first, paged), starting one, deleting one.

import {OpenHandsClient, OpenHandsError} from './openhands-client.js';
import {$, el, errorText, formatTime} from './app-dom.js';
import {AGENT_STATE_LABELS} from './app-render.js';

const PAGE_SIZE = 20;

/**
 * The conversation list and the new-conversation form.
 * Hooks: onNotice(text), onUnauthorized(), onCreated(conversationId).
 */
export class ListView {
  /**
   * @param {OpenHandsClient} api a client used for REST only (it never opens a stream)
   * @param {{onNotice: Function, onUnauthorized: Function, onCreated: Function}} hooks
   */
  constructor(api, hooks) {
    this.api = api;
    this.hooks = hooks;
    this.list = $('#conv-list');
    this.more = /** @type {HTMLButtonElement} */ ($('#load-more'));
    this.nextPageId = null;
    this.generation = 0; // bumped by each refresh: a page fetched for an older list is dropped
    this.loading = null; // the "Load more" fetch in flight (one at a time)
    this.more.addEventListener('click', () => this.loadMore());
    $('#new-form').addEventListener('submit', (event) => {
      event.preventDefault();
      this.create();
    });
  }

  /** Load the first page again (the list shows what the server has now); the latest refresh wins. */
  async refresh() {
    this.generation += 1;
    this.nextPageId = null;
    this.loading = null;
    this.list.replaceChildren();
    $('#list-empty').hidden = true;
    await this.loadPage(null, this.generation);
  }

  /** The next page, after the last one shown (next_page_id); one at a time. */
  async loadMore() {
    if (!this.nextPageId) return;
    if (!this.loading) this.loading = this.loadPage(this.nextPageId, this.generation);
    await this.loading;
  }

  /** Fetch one page and append its conversations, unless the list was refreshed meanwhile. */
  async loadPage(pageId, generation) {
    const status = $('#list-status');
    const current = () => generation === this.generation;
    status.textContent = 'Loading conversations…';
    this.more.disabled = true;
    try {
      const page = await this.api.listConversations({limit: PAGE_SIZE, pageId: pageId || undefined});
      if (!current()) return;
      for (const conversation of page.results || []) this.list.append(this.item(conversation));
      this.nextPageId = page.next_page_id || null;
    } catch (error) {
      if (current()) this.failed(error, 'Could not load the conversations');
    } finally {
      if (current()) {
        if (pageId) this.loading = null;
        status.textContent = '';
        this.more.hidden = !this.nextPageId;
        this.more.disabled = false;
        $('#list-empty').hidden = this.list.childElementCount > 0;
      }
    }
  }

  /** One conversation in the list: a link that opens it, and its Delete button. */
  item(conversation) {
    const id = String(conversation.conversation_id);
    const title = conversation.title || `Conversation ${id.slice(0, 8)}`;
    const details = [formatTime(conversation.created_at)];
    if (conversation.repository) details.unshift(conversation.repository);
    const state = conversation.agent_state ? AGENT_STATE_LABELS[conversation.agent_state] || conversation.agent_state : '';
    const link = el('a', {className: 'conv-link', attrs: {href: `#/c/${encodeURIComponent(id)}`}}, [
      el('span', {className: 'conv-title', text: title}),
      el('span', {className: 'conv-meta'}, [
        el('span', {text: details.filter(Boolean).join(' · ')}),
        state ? el('span', {className: 'badge', text: state, attrs: {'data-state': conversation.agent_state}}) : null,
      ]),
    ]);
    const remove = el('button', {className: 'btn btn-quiet btn-danger-text', text: 'Delete',
      attrs: {type: 'button', 'aria-label': `Delete conversation: ${title}`}});
    remove.addEventListener('click', () => this.remove(id, title));
    return el('li', {className: 'conv-item', attrs: {'data-conversation-id': id}}, [link, remove]);
  }

  /** Delete after the user confirms; the conversation leaves the list. */
  async remove(id, title) {
    if (!(await confirmDelete(title))) return;
    try {
      await this.api.deleteConversation(id);
      this.forget(id);
    } catch (error) {
      this.failed(error, 'Could not delete the conversation');
    }
  }

  /** Drop a conversation from the list (deleted here or elsewhere). */
  forget(id) {
    for (const item of this.list.querySelectorAll('li')) {
      if (item.getAttribute('data-conversation-id') === id) item.remove();
    }
    $('#list-empty').hidden = this.list.childElementCount > 0;
  }

  /** Start a conversation from the form; then open it. */
  async create() {
    const message = /** @type {HTMLTextAreaElement} */ ($('#new-message'));
    const repo = /** @type {HTMLInputElement} */ ($('#new-repo'));
    const error = $('#new-error');
    error.hidden = true;
    if (!message.value.trim()) {
      showFieldError(error, 'Write a first message for the agent.', message);
      return;
    }
    const button = /** @type {HTMLButtonElement} */ ($('#new-button'));
    button.disabled = true;
    try {
      const answer = await createConversation(repo.value.trim() || undefined, message.value);
      message.value = '';
      repo.value = '';
      this.hooks.onCreated(answer.conversation_id);
    } catch (failure) {
      if (failure && failure.status === 401) this.hooks.onUnauthorized();
      else showFieldError(error, `Could not start it: ${errorText(failure)}`, message);
    } finally {
      button.disabled = false;
    }
  }

  /** A REST failure: 401 means signed out; anything else is said on the notice line. */
  failed(error, what) {
    if (error && error.status === 401) this.hooks.onUnauthorized();
    else this.hooks.onNotice(`${what}: ${errorText(error)}`);
  }
}

/**
 * POST /api/conversations (the session cookie authenticates). The client's createConversation would also
 * open a stream to the new conversation: the conversation view opens its own.
 * @param {string|undefined} repository
 * @param {string} initialMessage
 * @returns {Promise<{conversation_id: string}>}
 * @throws {OpenHandsError} with the HTTP status (0: no answer)
 */
async function createConversation(repository, initialMessage) {
  const body = {initial_user_msg: initialMessage};
  if (repository) body.repository = repository;
  let response;
  let answer = null;
  try {
    response = await fetch('/api/conversations', {method: 'POST', credentials: 'include', cache: 'no-store',
      headers: {'Content-Type': 'application/json', Accept: 'application/json'}, body: JSON.stringify(body)});
    answer = await response.json().catch(() => null);
  } catch (cause) {
    throw new OpenHandsError(`Network error: ${(cause && cause.message) || cause}`, {code: 'network_error', cause});
  }
  if (response.ok && answer && typeof answer.conversation_id === 'string') return answer;
  const status = response.status;
  const message = answer && typeof answer.message === 'string' ? answer.message : `HTTP error! status: ${status}`;
  throw new OpenHandsError(message, {status, code: (answer && answer.error) || `http_${status}`});
}

/** Say what is wrong under a form and point the field at it. */
function showFieldError(node, text, field) {
  node.textContent = text;
  node.hidden = false;
  field.setAttribute('aria-describedby', node.id);
  field.focus();
}

/**
 * Ask "Delete this conversation?" in a modal <dialog>; resolves true when the user confirms.
 * @param {string} title
 * @returns {Promise<boolean>}
 */
export function confirmDelete(title) {
  const dialog = /** @type {HTMLDialogElement} */ ($('#confirm-delete'));
  $('#confirm-text').textContent = `“${title}” and all its events will be deleted. This cannot be undone.`;
  return new Promise((resolve) => {
    const done = (answer) => {
      ok.removeEventListener('click', yes);
      cancel.removeEventListener('click', no);
      dialog.removeEventListener('close', no);
      if (dialog.open) dialog.close();
      resolve(answer);
    };
    const yes = () => done(true);
    const no = () => done(false);
    const ok = $('#confirm-ok');
    const cancel = $('#confirm-cancel');
    ok.addEventListener('click', yes);
    cancel.addEventListener('click', no);
    dialog.addEventListener('close', no); // Escape closes it: that is a "no"
    dialog.showModal();
    cancel.focus(); // the safe choice has the focus
  });
}
