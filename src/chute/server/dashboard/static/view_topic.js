// One topic (#/topics/NAME): its subscriptions (subscribe a queue with a pattern, unsubscribe), publish a message
// with a subject, delete the topic (confirmed).

import {field, h, LiveTable, setText} from './dom.js';
import * as fmt from './format.js';
import {seg} from './api.js';
import {publishForm} from './messages.js';
import {actionForm, confirmDialog, errorText, outcome, queueLink, section, showOutcome, statList} from './ui.js';

export function topicView(ctx, name) {
  const path = `/topics/${seg(name)}`;
  const missing = h('p', {class: 'outcome error', role: 'alert', hidden: true});
  const info = statList([['subscriptions', 'Subscriptions'], ['retention', 'Retention'],
    ['retention_bytes', 'Retention bytes'], ['dedup', 'Dedup window']]);
  const subsOut = outcome();

  async function unsubscribe(sub) {
    const ok = await confirmDialog({title: 'Unsubscribe?', confirmLabel: 'Unsubscribe',
      message: `Stop routing messages of ${name} that match ${sub.pattern} to queue ${sub.queue}?`});
    if (!ok) return;
    try {
      const query = `pattern=${encodeURIComponent(sub.pattern)}&queue=${encodeURIComponent(sub.queue)}`;
      await ctx.api('DELETE', `${path}/subscriptions?${query}`);
      showOutcome(subsOut, `Unsubscribed ${sub.queue} from ${sub.pattern}.`, true);
      ctx.refresh();
    } catch (err) {
      showOutcome(subsOut, errorText(err), false);
    }
  }

  const subs = new LiveTable({
    caption: 'Subscriptions',
    key: (s) => JSON.stringify([s.pattern, s.queue]),
    empty: 'No subscriptions: messages published to this topic go nowhere.',
    columns: [
      {label: 'Pattern', cell: (s) => h('code', {}, s.pattern)},
      {label: 'Queue', cell: (s) => queueLink(s.queue)},
      {label: 'Filter', text: (s) => (s.filter ? JSON.stringify(s.filter) : 'none')},
      {label: 'Kind', text: (s) => (s.ephemeral ? 'ephemeral' : 'durable')},
      {label: 'Action', cell: (s) => h('button', {type: 'button', class: 'secondary small',
        'aria-label': `Unsubscribe ${s.queue} from ${s.pattern}`, onclick: () => unsubscribe(s)}, 'Unsubscribe')},
    ],
  });

  const pattern = h('input', {name: 'pattern', required: true, value: '>', autocomplete: 'off'});
  const queue = h('input', {name: 'queue', required: true, autocomplete: 'off', list: 'queue-names'});
  const queueNames = h('datalist', {id: 'queue-names'});
  const start = h('select', {name: 'start'}, h('option', {value: 'now'}, 'new messages only'),
    h('option', {value: 'earliest'}, 'every retained message'));
  const filter = h('textarea', {name: 'filter', rows: 2, placeholder: '{"region": "eu"}'});
  const subscribeForm = h('form', {'aria-label': 'Subscribe a queue'},
    h('div', {class: 'fields'},
      field('Pattern', pattern, 'Dot-separated words; * one word, > the rest'),
      field('Queue', queue, 'An existing queue'),
      field('Start with', start),
      h('div', {class: 'field wide'}, field('Header filter (JSON)', filter, 'Optional'))),
    queueNames,
    h('div', {class: 'buttons'}, h('button', {type: 'submit'}, 'Subscribe')));
  actionForm(subscribeForm, async () => {
    let parsedFilter = null;
    if (filter.value.trim()) {
      try {
        parsedFilter = JSON.parse(filter.value);
      } catch (err) {
        throw new Error(`the filter is not valid JSON (${err.message})`);
      }
    }
    const sub = await ctx.api('POST', `${path}/subscriptions`,
      {pattern: pattern.value.trim(), queue: queue.value.trim(), filter: parsedFilter, start: start.value});
    ctx.refresh();
    return `Subscribed queue ${sub.queue} to ${sub.pattern}.`;
  });

  const deleteOut = outcome();
  const deleteButton = h('button', {type: 'button', class: 'danger'}, 'Delete topic…');
  deleteButton.addEventListener('click', async () => {
    const ok = await confirmDialog({title: `Delete topic ${name}?`, confirmLabel: 'Delete',
      message: `This deletes ${name} and its subscriptions. The subscribed queues and their messages stay.`});
    if (!ok) return;
    try {
      await ctx.api('DELETE', path);
      ctx.navigate('#/topics');
    } catch (err) {
      showOutcome(deleteOut, errorText(err), false);
    }
  });

  const root = h('div', {class: 'view topic'},
    h('nav', {class: 'breadcrumb', 'aria-label': 'Breadcrumb'},
      h('ol', {}, h('li', {}, h('a', {href: '#/topics'}, 'Topics')), h('li', {'aria-current': 'page'}, name))),
    h('h1', {}, 'Topic ', h('span', {class: 'mono'}, name)), missing,
    section('Settings', info.el),
    section('Subscriptions', subs.el, subsOut),
    h('div', {class: 'grid'},
      section('Subscribe a queue', subscribeForm),
      section('Publish a message', publishForm(ctx, `${path}/messages`, {withSubject: true}))),
    h('section', {class: 'danger-zone', 'aria-label': 'Delete'}, h('h2', {}, 'Delete'),
      h('div', {class: 'buttons'}, deleteButton), deleteOut));

  async function refresh(current) {
    let topic;
    try {
      topic = await ctx.api('GET', path);
    } catch (err) {
      if (err.status === 404 && current()) {
        missing.hidden = false;
        setText(missing, `${errorText(err)}. It may have been deleted.`);
        return;
      }
      throw err;
    }
    // Only suggestions for the queue field: without them the field still takes any name, so a failure here
    // (say, no permission to list queues) must not stop the rest of the page.
    const queues = await ctx.api('GET', '/queues').catch(() => null);
    if (!current()) return;
    missing.hidden = true;
    const st = topic.settings;
    info.update({subscriptions: fmt.count((topic.subscriptions || []).length),
      retention: st.retention_s === null ? 'off' : fmt.duration(st.retention_s),
      retention_bytes: st.retention_bytes === null ? 'off' : fmt.bytes(st.retention_bytes),
      dedup: fmt.duration(st.dedup_window_s)});
    subs.update(topic.subscriptions || []);
    if (queues) {
      const names = queues.queues.map((q) => q.name).sort();
      if (queueNames.dataset.names !== names.join('\n')) {
        queueNames.dataset.names = names.join('\n');
        queueNames.replaceChildren(...names.map((n) => h('option', {value: n})));
      }
    }
  }

  return {title: `Topic ${name}`, root, refresh};
}
