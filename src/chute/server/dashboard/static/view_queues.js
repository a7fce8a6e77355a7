// The queue list (#/queues): depth, in flight, delayed, dead-lettered and live rates of every queue the user may
// see, and a form to create a queue.

import {field, h, LiveTable} from './dom.js';
import * as fmt from './format.js';
import {now, RateBook} from './rates.js';
import {actionForm, numberOrNull, queueLink, section} from './ui.js';
import {seg} from './api.js';

export function queuesView(ctx) {
  const book = new RateBook();
  let rates = new Map();
  const rate = (name, key) => fmt.rate(rates.get(name)?.[key]);
  const table = new LiveTable({
    caption: 'Queues',
    key: (q) => q.name,
    empty: 'No queues yet.',
    columns: [
      {label: 'Name', cell: (q) => queueLink(q.name)},
      {label: 'Ready', numeric: true, text: (q) => fmt.count(q.stats.ready)},
      {label: 'In flight', numeric: true, text: (q) => fmt.count(q.stats.in_flight)},
      {label: 'Delayed', numeric: true, text: (q) => fmt.count(q.stats.delayed)},
      {label: 'Dead-lettered', numeric: true, text: (q) => fmt.count(q.stats.dead_lettered)},
      {label: 'Publish /s', numeric: true, text: (q) => rate(q.name, 'published')},
      {label: 'Deliver /s', numeric: true, text: (q) => rate(q.name, 'delivered')},
      {label: 'Ack /s', numeric: true, text: (q) => rate(q.name, 'acked')},
      {label: 'Oldest', numeric: true, text: (q) => (q.stats.ready + q.stats.delayed + q.stats.in_flight > 0
        ? fmt.duration(q.stats.oldest_age_s) : '–')},
      {label: 'Kind', text: (q) => [q.settings.fifo ? 'FIFO' : 'standard', q.ephemeral ? 'ephemeral' : '',
        q.dead_letter_sources && q.dead_letter_sources.length ? 'dead-letter queue' : ''].filter(Boolean).join(', ')},
    ],
  });

  const name = h('input', {name: 'name', required: true, pattern: '[A-Za-z0-9][A-Za-z0-9_.\\-]{0,199}',
    autocomplete: 'off'});
  const dlq = h('input', {name: 'dead_letter_queue', autocomplete: 'off'});
  const maxDeliveries = h('input', {name: 'max_deliveries', type: 'number', min: 1, step: 1});
  const lease = h('input', {name: 'lease_s', type: 'number', min: 0.001, step: 'any', placeholder: '30'});
  const fifo = h('input', {name: 'fifo', type: 'checkbox'});
  const form = h('form', {'aria-label': 'Create a queue'},
    h('div', {class: 'fields'},
      field('Name', name, 'Letters, digits, _ - .'),
      field('Dead-letter queue', dlq, 'Optional'),
      field('Max deliveries', maxDeliveries, 'Optional'),
      field('Lease (s)', lease, 'Default 30'),
      h('div', {class: 'field check'}, fifo, h('label', {for: (fifo.id = 'create-fifo')}, 'FIFO groups'))),
    h('div', {class: 'buttons'}, h('button', {type: 'submit'}, 'Create queue')));
  actionForm(form, async () => {
    const settings = {};
    if (dlq.value.trim()) settings.dead_letter_queue = dlq.value.trim();
    const md = numberOrNull(maxDeliveries);
    if (md !== null) settings.max_deliveries = md;
    const ls = numberOrNull(lease);
    if (ls !== null) settings.lease_s = ls;
    if (fifo.checked) settings.fifo = true;
    const queueName = name.value.trim();
    await ctx.api('PUT', `/queues/${seg(queueName)}`, settings);
    form.reset();
    ctx.refresh();
    return h('span', {}, 'Created queue ', queueLink(queueName), '.');
  });

  const root = h('div', {class: 'view queues'},
    h('h1', {}, 'Queues'),
    section('All queues', table.el),
    section('Create a queue', form));

  async function refresh(current) {
    const reply = await ctx.api('GET', '/queues');
    if (!current()) return;
    const queues = reply.queues.slice().sort((a, b) => a.name.localeCompare(b.name));
    rates = book.sample(now(), queues, (q) => q.name, (q) => q.stats);
    table.update(queues);
  }

  return {title: 'Queues', root, refresh};
}
