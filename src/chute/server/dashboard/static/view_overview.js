// The overview (#/): live message rates from counter deltas, the totals of every queue, and the broker's state.

import {h} from './dom.js';
import * as fmt from './format.js';
import {now, RateMeter} from './rates.js';
import {RateChart} from './chart.js';
import {section, statList} from './ui.js';

export function overviewView(ctx) {
  const meter = new RateMeter();
  const chart = new RateChart(['published', 'delivered', 'acked']);
  const rates = statList([['published', 'Publish'], ['delivered', 'Deliver'], ['acked', 'Ack']], 'stats rates');
  const messages = statList([['ready', 'Ready'], ['in_flight', 'In flight'], ['delayed', 'Delayed'],
    ['dead_lettered', 'Dead-lettered'], ['bytes', 'Stored'], ['published', 'Published (total)'],
    ['delivered', 'Delivered (total)'], ['acked', 'Acked (total)']]);
  const broker = statList([['queues', 'Queues'], ['topics', 'Topics'], ['connections', 'Connections'],
    ['consumers', 'Consumers'], ['state', 'State'], ['uptime', 'Up for'], ['log_bytes', 'Log on disk'],
    ['segments', 'Log segments'], ['version', 'Version']]);

  const root = h('div', {class: 'view overview'},
    h('h1', {}, 'Overview'),
    h('div', {class: 'grid'},
      section('Message rates', rates.el, chart.el),
      section('Messages in all queues', messages.el)),
    section('Broker', broker.el,
      h('p', {class: 'hint'}, 'See ', h('a', {href: '#/queues'}, 'queues'), ', ', h('a', {href: '#/topics'}, 'topics'),
        ' and ', h('a', {href: '#/connections'}, 'connections'), '.')));

  async function refresh(current) {
    const overview = await ctx.api('GET', '/overview');
    if (!current()) return;
    const totals = overview.totals || {};
    const r = meter.sample(now(), totals);
    rates.update({published: fmt.rate(r.published), delivered: fmt.rate(r.delivered), acked: fmt.rate(r.acked)});
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
      state: overview.state ?? '–', uptime: fmt.duration(overview.uptime_s), log_bytes: fmt.bytes(storage.log_bytes),
      segments: fmt.count(storage.segments), version: overview.version ?? '–',
    });
  }

  return {title: 'Overview', root, refresh};
}
