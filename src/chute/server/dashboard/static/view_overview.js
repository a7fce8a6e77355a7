// The overview (#/): live message rates from counter deltas, the totals of every queue, and the broker's state.

import {h, LiveTable, setText} from './dom.js';
import * as fmt from './format.js';
import {now, RateBook, RateMeter} from './rates.js';
import {RateChart} from './chart.js';
import {queueLink, section, statList} from './ui.js';

const BUSIEST = 6;

export function overviewView(ctx) {
  const meter = new RateMeter();
  const chart = new RateChart(['published', 'delivered', 'acked']);
  const rates = statList([['publish_rate', 'Publish'], ['deliver_rate', 'Deliver'], ['ack_rate', 'Ack']],
    'stats rates');
  const messages = statList([['ready', 'Ready'], ['in_flight', 'In flight'], ['delayed', 'Delayed'],
    ['dead_lettered', 'Dead-lettered'], ['bytes', 'Stored'], ['published', 'Published (total)'],
    ['delivered', 'Delivered (total)'], ['acked', 'Acked (total)']]);
  const broker = statList([['queues', 'Queues'], ['topics', 'Topics'], ['connections', 'Connections'],
    ['consumers', 'Consumers'], ['state', 'State'], ['uptime', 'Up for'], ['log_bytes', 'Log on disk'],
    ['segments', 'Log segments']]);
  const version = h('span', {}, '');

  const book = new RateBook();
  let queueRates = new Map();
  const busiest = new LiveTable({
    caption: `Busiest queues (by depth, top ${BUSIEST})`,
    key: (q) => q.name,
    empty: 'No queues yet.',
    columns: [
      {label: 'Queue', cell: (q) => queueLink(q.name)},
      {label: 'Ready', numeric: true, text: (q) => fmt.count(q.stats.ready)},
      {label: 'In flight', numeric: true, text: (q) => fmt.count(q.stats.in_flight)},
      {label: 'Publish /s', numeric: true, text: (q) => fmt.rate(queueRates.get(q.name)?.published)},
      {label: 'Ack /s', numeric: true, text: (q) => fmt.rate(queueRates.get(q.name)?.acked)},
    ],
  });

  const root = h('div', {class: 'view overview'},
    h('h1', {}, 'Overview'),
    h('div', {class: 'grid'},
      section('Message rates', rates.el, chart.el),
      h('div', {class: 'column'},
        section('Messages in all queues', messages.el),
        section('Busiest queues', busiest.el))),
    section('Broker', broker.el,
      h('p', {class: 'hint'}, version, 'See ', h('a', {href: '#/queues'}, 'queues'), ', ',
        h('a', {href: '#/topics'}, 'topics'),
        ' and ', h('a', {href: '#/connections'}, 'connections'), '.')));

  async function refresh(current) {
    const [overview, list] = await Promise.all([ctx.api('GET', '/overview'), ctx.api('GET', '/queues')]);
    if (!current()) return;
    queueRates = book.sample(now(), list.queues, (q) => q.name, (q) => q.stats);
    const depth = (q) => q.stats.ready + q.stats.in_flight + q.stats.delayed;
    busiest.update(list.queues.slice().sort((a, b) => depth(b) - depth(a) || a.name.localeCompare(b.name))
      .slice(0, BUSIEST));
    const totals = overview.totals || {};
    const r = meter.sample(now(), totals);
    rates.update({publish_rate: fmt.rate(r.published), deliver_rate: fmt.rate(r.delivered),
      ack_rate: fmt.rate(r.acked)});
    if (r.published !== null) chart.push(r);
    messages.update({
      ready: fmt.count(totals.ready), in_flight: fmt.count(totals.in_flight), delayed: fmt.count(totals.delayed),
      dead_lettered: fmt.count(totals.dead_lettered), bytes: fmt.bytes(totals.bytes),
      published: fmt.count(totals.published), delivered: fmt.count(totals.delivered), acked: fmt.count(totals.acked),
    });
    const storage = overview.storage || {};
    broker.update({
      queues: fmt.count(overview.queues), topics: fmt.count(overview.topics),
      connections: fmt.count(overview.connections), consumers: fmt.count(overview.consumers),
      log_bytes: fmt.bytes(storage.log_bytes), segments: fmt.count(storage.segments),
      state: storage.read_only ? `${overview.state}, storage read-only` : overview.state ?? '–',
      uptime: fmt.duration(overview.uptime_s),
    });
    setText(version, `Chute ${overview.version ?? ''}. `);
  }

  return {title: 'Overview', root, refresh};
}
