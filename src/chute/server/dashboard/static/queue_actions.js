// The parts of a queue page that change a queue for good: purge and delete (each asks first), and the dead-letter
// section with its redrive. Each part reports its outcome in words next to its controls.

import {field, h} from './dom.js';
import * as fmt from './format.js';
import {actionForm, confirmDialog, errorText, numberOrNull, outcome, queueLink, showOutcome} from './ui.js';

/** A button that asks `question` first, then runs `action` (returning a success text, or null after leaving). */
function confirmedButton(label, question, action, out) {
  const button = h('button', {type: 'button', class: 'danger'}, label);
  button.addEventListener('click', async () => {
    if (!(await confirmDialog(question()))) return;
    try {
      const text = await action();
      if (text) showOutcome(out, text, true);
    } catch (err) {
      showOutcome(out, errorText(err), false);
    }
  });
  return button;
}

/** Purge and delete; `ready()` is the ready count last seen (for the question). */
export function dangerZone(ctx, name, path, ready) {
  const out = outcome();
  const purge = confirmedButton('Purge…', () => ({
    title: `Purge queue ${name}?`, confirmLabel: 'Purge',
    message: `This deletes every ready message of ${name} (${ready() ?? 'unknown'} now) for good. ` +
      'Messages in flight are not affected.',
  }), async () => {
    const reply = await ctx.api('POST', `${path}/purge`);
    ctx.refresh();
    return `Purged ${fmt.plural(reply.purged, 'message')}.`;
  }, out);
  const remove = confirmedButton('Delete queue…', () => ({
    title: `Delete queue ${name}?`, confirmLabel: 'Delete',
    message: `This deletes ${name} and every message in it, for good.`,
  }), async () => {
    await ctx.api('DELETE', path);
    ctx.navigate('#/queues');
    return null;
  }, out);
  return h('section', {class: 'danger-zone', 'aria-label': 'Purge or delete'},
    h('h2', {}, 'Purge or delete'), h('div', {class: 'buttons'}, purge, remove), out);
}

/** Where this queue's dead letters go, whose dead letters it holds, and a redrive form: {el, show(detail)}. */
export function deadLetters(ctx, path) {
  const info = h('p', {});
  const max = h('input', {name: 'max_messages', type: 'number', min: 1, step: 1});
  const form = h('form', {'aria-label': 'Redrive dead letters', class: 'inline'},
    field('Messages to move', max, 'Empty: all'),
    h('button', {type: 'submit'}, 'Redrive to source queues'));
  actionForm(form, async () => {
    const reply = await ctx.api('POST', `${path}/redrive`, {max_messages: numberOrNull(max)});
    ctx.refresh();
    return `Moved ${fmt.plural(reply.moved, 'message')} back to their source queues.`;
  });

  function show(detail) {
    const sources = detail.dead_letter_sources || [];
    const target = detail.settings.dead_letter_queue;
    const key = JSON.stringify([sources, target]);
    if (info.dataset.key === key) return;  // unchanged: keep the links (and any focus on them)
    info.dataset.key = key;
    const parts = [];
    if (sources.length) {
      parts.push('This is the dead-letter queue of ');
      sources.forEach((source, i) => parts.push(...(i ? [', '] : []), queueLink(source)));
      parts.push('. Redrive moves its messages back to the queue each came from. ');
    } else {
      parts.push('No queue sends its dead letters here; redrive moves dead-lettered messages (if any) back. ');
    }
    if (target) parts.push('Dead letters of this queue go to ', queueLink(target), '.');
    else parts.push('This queue has no dead-letter queue: its dead letters are dropped.');
    info.replaceChildren(...parts.map((p) => (typeof p === 'string' ? document.createTextNode(p) : p)));
  }

  return {el: h('div', {}, info, form), show};
}
