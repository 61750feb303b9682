// The list view: the user's conversations (newest first, paged), starting one, deleting one.

import {OpenHandsClient} from './openhands-client.js';
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
    this.loading = null;
    this.more.addEventListener('click', () => this.loadMore());
    $('#new-form').addEventListener('submit', (event) => {
      event.preventDefault();
      this.create();
    });
  }

  /** Load the first page again (the list shows what the server has now). */
  async refresh() {
    this.nextPageId = null;
    this.list.replaceChildren();
    $('#list-empty').hidden = true;
    await this.loadPage(null);
  }

  /** The next page, after the last one shown (next_page_id). */
  async loadMore() {
    if (this.nextPageId) await this.loadPage(this.nextPageId);
  }

  /** Fetch one page and append its conversations; one fetch at a time. */
  async loadPage(pageId) {
    if (this.loading) return this.loading;
    const status = $('#list-status');
    status.textContent = 'Loading conversations…';
    this.more.disabled = true;
    this.loading = (async () => {
      try {
        const page = await this.api.listConversations({limit: PAGE_SIZE, pageId: pageId || undefined});
        for (const conversation of page.results || []) this.list.append(this.item(conversation));
        this.nextPageId = page.next_page_id || null;
        status.textContent = '';
      } catch (error) {
        status.textContent = '';
        this.failed(error, 'Could not load the conversations');
      } finally {
        this.more.hidden = !this.nextPageId;
        this.more.disabled = false;
        $('#list-empty').hidden = this.list.childElementCount > 0;
        this.loading = null;
      }
    })();
    return this.loading;
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
    // createConversation connects its client to the new conversation; the conversation view opens its own
    // (with its handlers in place from the first event), so this one is closed once it has the id.
    const creator = new OpenHandsClient(null);
    try {
      const answer = await creator.createConversation(repo.value.trim() || undefined, message.value);
      message.value = '';
      repo.value = '';
      this.hooks.onCreated(answer.conversation_id);
    } catch (failure) {
      if (failure && failure.status === 401) this.hooks.onUnauthorized();
      else showFieldError(error, `Could not start it: ${errorText(failure)}`, message);
    } finally {
      creator.disconnect();
      button.disabled = false;
    }
  }

  /** A REST failure: 401 means signed out; anything else is said on the notice line. */
  failed(error, what) {
    if (error && error.status === 401) this.hooks.onUnauthorized();
    else this.hooks.onNotice(`${what}: ${errorText(error)}`);
  }
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
