// Widgets shared by the views: forms that report their outcome in words, a confirmation dialog, stat lists.
// Invariants: every failed action shows the API's error message next to the control that caused it (never
// dropped); every dialog closes with Escape and gives the focus back to where it was.

import {h, setText, uid} from './dom.js';

/** Words for an error: the API's message, with what kind of refusal it was. */
export function errorText(err) {
  if (err && err.status === 403) return `Not allowed: ${err.message}`;
  if (err && err.status === 401) return `Not signed in: ${err.message}`;
  return `Error: ${err && err.message ? err.message : String(err)}`;
}

/** A live region for the outcome of an action (read out by screen readers). */
export function outcome() {
  return h('p', {class: 'outcome', role: 'status', 'aria-live': 'polite'});
}

export function showOutcome(el, text, ok) {
  el.classList.toggle('error', !ok);
  el.classList.toggle('ok', ok);
  el.setAttribute('role', ok ? 'status' : 'alert');
  setText(el, text);
}

/**
 * Run `handler(form)` when the form is submitted; it returns a success message (string or Node) or throws.
 * The submit button is disabled while it runs; the outcome is shown under the form.
 */
export function actionForm(form, handler, resultEl) {
  const out = resultEl || outcome();
  if (!resultEl) form.appendChild(out);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const buttons = form.querySelectorAll('button');
    buttons.forEach((b) => { b.disabled = true; });
    showOutcome(out, 'Working…', true);
    try {
      const message = await handler(form);
      out.replaceChildren();
      showOutcome(out, '', true);
      if (message instanceof Node) out.appendChild(message);
      else setText(out, message || 'Done.');
    } catch (err) {
      showOutcome(out, errorText(err), false);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  });
  return form;
}

/** Ask before doing something that cannot be undone. Resolves true only if the user confirms. */
export function confirmDialog({title, message, confirmLabel}) {
  return new Promise((resolve) => {
    const returnFocus = document.activeElement;
    const titleId = uid('dialog-title');
    const descId = uid('dialog-desc');
    const ok = h('button', {type: 'submit', value: 'confirm', class: 'danger'}, confirmLabel);
    const cancel = h('button', {type: 'submit', value: 'cancel', class: 'secondary'}, 'Cancel');
    const dialog = h('dialog', {'aria-labelledby': titleId, 'aria-describedby': descId},
      h('form', {method: 'dialog'},
        h('h2', {id: titleId}, title),
        h('p', {id: descId}, message),
        h('div', {class: 'buttons'}, cancel, ok)));
    dialog.addEventListener('close', () => {
      dialog.remove();
      if (returnFocus && returnFocus.isConnected) returnFocus.focus();
      resolve(dialog.returnValue === 'confirm');
    });
    document.body.appendChild(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

/** A <dl> of named figures, updated in place: stats([['ready', 'Ready'], ...]).update({ready: '3'}). */
export function statList(items, className = 'stats') {
  const values = new Map();
  const el = h('dl', {class: className}, items.map(([key, label]) => {
    const dd = h('dd', {}, '–');
    values.set(key, dd);
    return h('div', {class: 'stat', 'data-stat': key}, h('dt', {}, label), dd);
  }));
  return {
    el,
    update(data) {
      for (const [key, text] of Object.entries(data)) {
        const dd = values.get(key);
        if (dd) setText(dd, text);
      }
    },
  };
}

/** A section with a heading (h2) and content. */
export function section(title, ...content) {
  const id = uid('section');
  return h('section', {'aria-labelledby': id}, h('h2', {id}, title), content);
}

/** Read an optional number field: '' is null (unlimited / off). */
export function numberOrNull(input) {
  const text = input.value.trim();
  if (text === '') return null;
  const value = Number(text);
  if (!Number.isFinite(value)) throw new Error(`${input.labels?.[0]?.textContent || input.name} must be a number`);
  return value;
}

/** Parse "name: value" lines into a headers object (null if empty). */
export function parseHeaders(text) {
  const headers = {};
  let any = false;
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (!line) continue;
    const colon = line.indexOf(':');
    if (colon <= 0) throw new Error(`header line ${i + 1} must look like "name: value"`);
    headers[line.slice(0, colon).trim()] = line.slice(colon + 1).trim();
    any = true;
  }
  return any ? headers : null;
}

/** A link to a queue's page. */
export function queueLink(name) {
  return h('a', {href: `#/queues/${encodeURIComponent(name)}`}, name);
}

export function topicLink(name) {
  return h('a', {href: `#/topics/${encodeURIComponent(name)}`}, name);
}
