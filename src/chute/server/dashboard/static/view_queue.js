// One queue (#/queues/NAME): live stats and rates, peeked messages, publish a test message, purge (confirmed),
// redrive dead letters, change settings, its consumers, delete (confirmed).
// Invariant: the settings form is filled from the broker once (and after a save), never by a poll, so a poll
// never overwrites what the user is typing.

import {field, h, LiveTable, setText} from './dom.js';
import * as fmt from './format.js';
import {seg} from './api.js';
import {now, RateMeter} from './rates.js';
import {messageTable, publishForm} from './messages.js';
import {actionForm, confirmDialog, errorText, numberOrNull, outcome, queueLink, section, showOutcome, statList}
  from './ui.js';

const PEEK_CHOICES = [10, 25, 50, 100];

// [field, label, kind, hint]; kind: number (empty = off), required number, text (empty = none), overflow.
const SETTINGS = [
  ['lease_s', 'Lease (s)', 'required', 'How long a delivery is leased'],
  ['max_deliveries', 'Max deliveries', 'number', 'Empty: unlimited'],
  ['dead_letter_queue', 'Dead-letter queue', 'text', 'Empty: dead letters are dropped'],
  ['delay_s', 'Delay (s)', 'required', 'Default delay of new messages'],
  ['retention_s', 'Retention (s)', 'number', 'Empty: kept until consumed'],
  ['max_length', 'Max length', 'number', 'Empty: unlimited'],
  ['max_bytes', 'Max bytes', 'number', 'Empty: unlimited'],
  ['overflow', 'When full', 'overflow', ''],
  ['rate_limit', 'Rate limit (/s)', 'number', 'Empty: no limit'],
  ['rate_burst', 'Rate burst', 'number', 'Empty: the default'],
  ['dedup_window_s', 'Dedup window (s)', 'required', ''],
];

function settingsForm(ctx, name, onSaved) {
  const inputs = {};
  for (const [key, , kind] of SETTINGS) {
    inputs[key] = kind === 'overflow'
      ? h('select', {name: key}, h('option', {value: 'reject'}, 'reject publishes'),
        h('option', {value: 'drop-oldest'}, 'drop the oldest'))
      : h('input', {name: key, autocomplete: 'off', ...(kind === 'text' ? {} : {type: 'number', step: 'any', min: 0}),
        ...(kind === 'required' ? {required: true} : {})});
  }
  let loaded = null;  // what the form was filled with (changes are computed against it)
  let latest = null;  // the broker's settings at the last poll (someone else may have changed them)
  const form = h('form', {'aria-label': 'Queue settings'},
    h('div', {class: 'fields'}, SETTINGS.map(([key, label, , hint]) => field(label, inputs[key], hint))),
    h('div', {class: 'buttons'}, h('button', {type: 'submit'}, 'Save settings'),
      h('button', {type: 'button', class: 'secondary', onclick: () => latest && fill(latest)}, 'Reset to current')));

  function fill(settings) {
    loaded = settings;
    for (const [key] of SETTINGS) {
      const value = settings[key];
      inputs[key].value = value === null || value === undefined ? '' : String(value);
    }
  }

  actionForm(form, async () => {
    const changes = {};
    for (const [key, label, kind] of SETTINGS) {
      let value;
      if (kind === 'overflow') value = inputs[key].value;
      else if (kind === 'text') value = inputs[key].value.trim() || null;
      else value = numberOrNull(inputs[key]);
      if (kind === 'required' && value === null) throw new Error(`${label} is required`);
      if (value !== loaded[key]) changes[key] = value;
    }
    if (Object.keys(changes).length === 0) return 'No changes to save.';
    const detail = await ctx.api('PATCH', `/queues/${seg(name)}`, changes);
    fill(detail.settings);
    onSaved();
    return `Saved: ${Object.keys(changes).join(', ')}.`;
  });
  /** Called by every poll: fills the form the first time only, so a poll never overwrites what is typed. */
  function seen(settings) {
    latest = settings;
    if (loaded === null) fill(settings);
  }

  return {form, seen};
}

export function queueView(ctx, name) {
  const path = `/queues/${seg(name)}`;
  const meter = new RateMeter();
  let peekCount = PEEK_CHOICES[0];
  let detail = null;

  const stats = statList([['ready', 'Ready'], ['in_flight', 'In flight'], ['delayed', 'Delayed'],
    ['dead_lettered', 'Dead-lettered'], ['bytes', 'Stored'], ['oldest', 'Oldest'],
    ['published_rate', 'Publish /s'], ['delivered_rate', 'Deliver /s'], ['acked_rate', 'Ack /s'],
    ['published', 'Published'], ['delivered', 'Delivered'], ['acked', 'Acked'], ['nacked', 'Nacked'],
    ['redelivered', 'Redelivered']]);
  const missing = h('p', {class: 'outcome error', role: 'alert', hidden: true});
  const messages = messageTable();
  const settings = settingsForm(ctx, name, () => ctx.refresh());
  const consumers = new LiveTable({
    caption: 'Consumers of this queue',
    key: (c) => String(c.id),
    empty: 'No consumers.',
    columns: [
      {label: 'Consumer', text: (c) => String(c.id)},
      {label: 'Connection', text: (c) => String(c.connection_id ?? c.connection ?? '–')},
      {label: 'Prefetch', numeric: true, text: (c) => fmt.count(c.prefetch)},
      {label: 'Unacked', numeric: true, text: (c) => fmt.count(c.unacked)},
    ],
  });

  const consumersNote = h('p', {class: 'outcome error', hidden: true});
  const peekSelect = h('select', {id: 'peek-count'}, PEEK_CHOICES.map((n) => h('option', {value: n}, String(n))));
  peekSelect.addEventListener('change', () => {
    peekCount = Number(peekSelect.value);
    ctx.refresh();
  });

  // Purge and delete: buttons that ask first.
  const purgeOut = outcome();
  const purgeButton = h('button', {type: 'button', class: 'danger'}, 'Purge…');
  purgeButton.addEventListener('click', async () => {
    const ready = detail ? fmt.count(detail.stats.ready) : 'all';
    const ok = await confirmDialog({title: `Purge queue ${name}?`, confirmLabel: 'Purge',
      message: `This deletes the ${ready} ready messages of ${name} for good. Messages in flight are not affected.`});
    if (!ok) return;
    try {
      const reply = await ctx.api('POST', `${path}/purge`);
      showOutcome(purgeOut, `Purged ${fmt.count(reply.purged)} messages.`, true);
      ctx.refresh();
    } catch (err) {
      showOutcome(purgeOut, errorText(err), false);
    }
  });
  const deleteOut = outcome();
  const deleteButton = h('button', {type: 'button', class: 'danger'}, 'Delete queue…');
  deleteButton.addEventListener('click', async () => {
    const ok = await confirmDialog({title: `Delete queue ${name}?`, confirmLabel: 'Delete',
      message: `This deletes ${name} and every message in it, for good.`});
    if (!ok) return;
    try {
      await ctx.api('DELETE', path);
      ctx.navigate('#/queues');
    } catch (err) {
      showOutcome(deleteOut, errorText(err), false);
    }
  });

  // Redrive: only meaningful on a dead-letter queue; the section explains where dead letters go.
  const deadLetterInfo = h('p', {});
  const redriveMax = h('input', {name: 'max_messages', type: 'number', min: 1, step: 1});
  const redriveForm = h('form', {'aria-label': 'Redrive dead letters', class: 'inline'},
    field('Messages to move', redriveMax, 'Empty: all'),
    h('button', {type: 'submit'}, 'Redrive to source queues'));
  actionForm(redriveForm, async () => {
    const reply = await ctx.api('POST', `${path}/redrive`, {max_messages: numberOrNull(redriveMax)});
    ctx.refresh();
    return `Moved ${fmt.count(reply.moved)} messages back to their source queues.`;
  });

  const heading = h('h1', {}, 'Queue ', h('span', {class: 'mono'}, name));
  const root = h('div', {class: 'view queue'},
    h('nav', {class: 'breadcrumb', 'aria-label': 'Breadcrumb'},
      h('ol', {}, h('li', {}, h('a', {href: '#/queues'}, 'Queues')), h('li', {'aria-current': 'page'}, name))),
    heading, missing,
    section('Now', stats.el),
    section('Messages', h('form', {class: 'inline', 'aria-label': 'Peek'},
      field('Show up to', peekSelect)),
    h('p', {class: 'hint'},
      'The next messages to be delivered (those in flight included), peeked without leasing them; updated live.'),
    messages.el),
    h('div', {class: 'grid'},
      section('Publish a test message', publishForm(ctx, `${path}/messages`, {onPublished: () => ctx.refresh()})),
      section('Dead letters', deadLetterInfo, redriveForm)),
    section('Settings', settings.form),
    section('Consumers', consumersNote, consumers.el),
    h('section', {class: 'danger-zone', 'aria-label': 'Purge or delete'},
      h('h2', {}, 'Purge or delete'),
      h('div', {class: 'buttons'}, purgeButton, deleteButton), purgeOut, deleteOut));

  function showDeadLetters(d) {
    const parts = [];
    if (d.dead_letter_sources && d.dead_letter_sources.length) {
      parts.push('This is the dead-letter queue of ');
      d.dead_letter_sources.forEach((source, i) => {
        if (i) parts.push(', ');
        parts.push(queueLink(source));
      });
      parts.push('. Redrive moves its messages back to the queue each came from.');
    } else {
      parts.push('No queue sends its dead letters here; redrive moves dead-lettered messages (if any) back. ');
    }
    parts.push(' ');
    if (d.settings.dead_letter_queue) {
      parts.push('Dead letters of this queue go to ', queueLink(d.settings.dead_letter_queue), '.');
    } else {
      parts.push('This queue has no dead-letter queue: its dead letters are dropped.');
    }
    const key = JSON.stringify([d.dead_letter_sources, d.settings.dead_letter_queue]);
    if (deadLetterInfo.dataset.key !== key) {
      deadLetterInfo.dataset.key = key;
      deadLetterInfo.replaceChildren(...parts.map((p) => (typeof p === 'string' ? document.createTextNode(p) : p)));
    }
  }

  async function refresh(current) {
    let fresh;
    try {
      fresh = await ctx.api('GET', path);
    } catch (err) {
      if (err.status === 404 && current()) {
        missing.hidden = false;
        setText(missing, `${errorText(err)}. It may have been deleted.`);
        return;
      }
      throw err;
    }
    const [peeked, consumerList] = await Promise.all([
      ctx.api('GET', `${path}/messages?max_messages=${peekCount}`),
      ctx.api('GET', '/consumers').catch((err) => err),  // shown in its section; the rest of the page still works
    ]);
    if (!current()) return;
    missing.hidden = true;
    detail = fresh;
    const s = fresh.stats;
    const r = meter.sample(now(), s);
    stats.update({ready: fmt.count(s.ready), in_flight: fmt.count(s.in_flight), delayed: fmt.count(s.delayed),
      dead_lettered: fmt.count(s.dead_lettered), bytes: fmt.bytes(s.bytes),
      oldest: s.ready + s.delayed + s.in_flight > 0 ? fmt.duration(s.oldest_age_s) : '–',
      published_rate: fmt.rate(r.published), delivered_rate: fmt.rate(r.delivered), acked_rate: fmt.rate(r.acked),
      published: fmt.count(s.published), delivered: fmt.count(s.delivered), acked: fmt.count(s.acked),
      nacked: fmt.count(s.nacked), redelivered: fmt.count(s.redelivered)});
    settings.seen(fresh.settings);
    showDeadLetters(fresh);
    messages.update(peeked.messages);
    if (consumerList instanceof Error) {
      consumersNote.hidden = false;
      setText(consumersNote, `Cannot list consumers. ${errorText(consumerList)}`);
    } else {
      consumersNote.hidden = true;
      consumers.update(consumerList.consumers.filter((c) => c.queue === name));
    }
  }

  return {title: `Queue ${name}`, root, refresh};
}
