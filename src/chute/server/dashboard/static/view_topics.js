// The topic list (#/topics): every topic with its subscriptions count and retention, and a form to create one.

import {field, h, LiveTable} from './dom.js';
import * as fmt from './format.js';
import {seg} from './api.js';
import {actionForm, numberOrNull, section, topicLink} from './ui.js';

export function topicsView(ctx) {
  const table = new LiveTable({
    caption: 'Topics',
    key: (t) => t.name,
    empty: 'No topics yet.',
    columns: [
      {label: 'Name', cell: (t) => topicLink(t.name)},
      {label: 'Subscriptions', numeric: true, text: (t) => fmt.count((t.subscriptions || []).length)},
      {label: 'Routes to', text: (t) => [...new Set((t.subscriptions || []).map((s) => s.queue))].join(', ') || '–'},
      {label: 'Retention',
        text: (t) => (t.settings.retention_s === null ? 'off' : fmt.duration(t.settings.retention_s))},
    ],
  });

  const name = h('input', {name: 'name', required: true, autocomplete: 'off'});
  const retention = h('input', {name: 'retention_s', type: 'number', min: 0.001, step: 'any'});
  const form = h('form', {'aria-label': 'Create a topic'},
    h('div', {class: 'fields'}, field('Name', name, 'Letters, digits, _ - .'),
      field('Retention (s)', retention, 'Optional: keep messages for new subscriptions')),
    h('div', {class: 'buttons'}, h('button', {type: 'submit'}, 'Create topic')));
  actionForm(form, async () => {
    const settings = {};
    const r = numberOrNull(retention);
    if (r !== null) settings.retention_s = r;
    const topicName = name.value.trim();
    await ctx.api('PUT', `/topics/${seg(topicName)}`, settings);
    form.reset();
    ctx.refresh();
    return h('span', {}, 'Created topic ', topicLink(topicName), '.');
  });

  const root = h('div', {class: 'view topics'}, h('h1', {}, 'Topics'),
    section('All topics', table.el), section('Create a topic', form));

  async function refresh(current) {
    const reply = await ctx.api('GET', '/topics');
    if (!current()) return;
    table.update(reply.topics.slice().sort((a, b) => a.name.localeCompare(b.name)));
  }

  return {title: 'Topics', root, refresh};
}
