// Connections and consumers (#/connections): every client connection (native protocol or AMQP 0-9-1) with its
// client, user, channels and leases, and every push consumer (an AMQP consumer with its consumer tag).

import {h, LiveTable} from './dom.js';
import * as fmt from './format.js';
import {queueLink, section} from './ui.js';

export function connectionsView(ctx) {
  const connections = new LiveTable({
    caption: 'Connections',
    key: (c) => String(c.id),
    empty: 'No clients are connected.',
    columns: [
      {label: 'ID', text: (c) => String(c.id)},
      {label: 'Protocol', text: (c) => c.protocol ?? 'native'},
      {label: 'Peer', text: (c) => c.peer ?? '–'},
      {label: 'Client', text: (c) => c.client_name || c.client || '–'},
      {label: 'User', text: (c) => c.user ?? '–'},
      {label: 'Connected since', text: (c) => fmt.time(c.connected_at ?? c.connected_since)},
      {label: 'Channels', numeric: true, text: (c) => (c.protocol === 'amqp' ? fmt.count(c.channels) : '–')},
      {label: 'Consumers', numeric: true, text: (c) => fmt.count((c.consumers || []).length)},
      {label: 'Leased', numeric: true, text: (c) => fmt.count(c.leased)},
    ],
  });
  const consumers = new LiveTable({
    caption: 'Consumers',
    key: (c) => `${c.connection_id}/${c.id}`,
    empty: 'No push consumers.',
    columns: [
      {label: 'Consumer', text: (c) => (c.tag ? `${c.id} (${c.tag})` : String(c.id))},
      {label: 'Queue', cell: (c) => queueLink(c.queue)},
      {label: 'Connection', text: (c) => String(c.connection_id ?? '–')},
      {label: 'Prefetch', numeric: true, text: (c) => fmt.count(c.prefetch)},
      {label: 'Unacked', numeric: true, text: (c) => fmt.count(c.unacked)},
    ],
  });

  const root = h('div', {class: 'view connections'}, h('h1', {}, 'Connections'),
    section('Clients', connections.el), section('Push consumers', consumers.el));

  async function refresh(current) {
    const [conns, cons] = await Promise.all([ctx.api('GET', '/connections'), ctx.api('GET', '/consumers')]);
    if (!current()) return;
    connections.update(conns.connections);
    consumers.update(cons.consumers);
  }

  return {title: 'Connections', root, refresh};
}
