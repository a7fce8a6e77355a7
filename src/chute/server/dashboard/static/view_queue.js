// One queue (#/queues/NAME): live stats and rates, peeked messages, publish a test message, purge (confirmed),
// redrive dead letters, change settings, its consumers, delete (confirmed).
// Invariant: the page is built once; each poll only updates it in place (figures, rows, the dead-letter links).

import {field, h, LiveTable, setText} from './dom.js';
import * as fmt from './format.js';
import {seg} from './api.js';
import {now, RateMeter} from './rates.js';
import {messageTable, publishForm} from './messages.js';
import {dangerZone, deadLetters} from './queue_actions.js';
import {settingsForm} from './queue_settings.js';
import {errorText, section, statList} from './ui.js';

const PEEK_CHOICES = [10, 25, 50, 100];

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

  const dead = deadLetters(ctx, path);
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
      section('Dead letters', dead.el)),
    section('Settings', settings.form),
    section('Consumers', consumersNote, consumers.el),
    dangerZone(ctx, name, path, () => (detail ? fmt.count(detail.stats.ready) : null)));

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
    dead.show(fresh);
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
