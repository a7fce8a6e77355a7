// The cluster (#/cluster), on a node started with --store: every node the cluster's database knows, whether it is
// alive, its heartbeat's age and the shards it holds; the shards nobody holds; and this node's own shards with
// their queue and topic counts. All from GET /api/v1/cluster (the answering node's view, renewed every heartbeat).
//
// Invariant: on a broker that is not a cluster node the page says so and shows no table.

import {h, LiveTable, setText} from './dom.js';
import * as fmt from './format.js';
import {section, statList} from './ui.js';

/** [0, 1, 2, 5, 7, 8] as '0-2, 5, 7-8' (as `chute cluster status` prints them). */
export function shardRanges(shards) {
  const parts = [];
  for (const shard of shards) {
    const last = parts[parts.length - 1];
    if (last && last[1] === shard - 1) last[1] = shard;
    else parts.push([shard, shard]);
  }
  return parts.map(([low, high]) => (low === high ? `${low}` : `${low}-${high}`)).join(', ');
}

export function clusterView(ctx) {
  const summary = statList([['node', 'This node'], ['health', 'Health'], ['alive', 'Nodes alive'],
    ['shards', 'Shards'], ['unowned', 'Unowned shards'], ['takeovers', 'Shards opened here'],
    ['store', 'Database']]);
  const nodes = new LiveTable({
    caption: 'Nodes',
    key: (n) => n.name,
    empty: 'No nodes are registered.',
    columns: [
      {label: 'Node', text: (n) => n.name},
      {label: 'Address', text: (n) => (n.port ? `${n.host}:${n.port}` : n.host)},
      {label: 'HTTP', text: (n) => (n.http_port ? String(n.http_port) : '–')},
      {label: 'Health', text: (n) => (n.alive ? 'alive' : 'down')},
      {label: 'Heartbeat', numeric: true, text: (n) => `${n.heartbeat_age_s.toFixed(1)} s ago`},
      {label: 'Shards held', numeric: true, text: (n) => fmt.count(n.shards.length)},
      {label: 'Which', text: (n) => shardRanges(n.shards) || '–'},
    ],
  });
  const local = new LiveTable({
    caption: 'Shards served by this node',
    key: (s) => String(s.shard),
    empty: 'This node serves no shard now.',
    columns: [
      {label: 'Shard', numeric: true, text: (s) => String(s.shard)},
      {label: 'Queues', numeric: true, text: (s) => fmt.count(s.queues)},
      {label: 'Topics', numeric: true, text: (s) => fmt.count(s.topics)},
      {label: 'Health', text: (s) => (s.healthy ? 'healthy' : 'store failed')},
    ],
  });
  const problem = h('p', {class: 'outcome error', role: 'status', hidden: true}, '');
  const content = h('div', {}, section('This node', summary.el, problem), section('Nodes', nodes.el),
    section('Shards here', local.el));
  const notCluster = h('p', {class: 'notice', hidden: true},
    'This broker is not a cluster node: it runs without --store (see docs/cluster.md).');
  const root = h('div', {class: 'view cluster'}, h('h1', {}, 'Cluster'), notCluster, content);

  async function refresh(current) {
    const status = await ctx.api('GET', '/cluster');
    if (!current()) return;
    notCluster.hidden = status.enabled;
    content.hidden = !status.enabled;
    if (!status.enabled) return;
    const alive = status.nodes.filter((n) => n.alive).length;
    summary.update({
      node: status.node, health: status.healthy ? 'healthy' : `unhealthy (${status.state})`,
      alive: `${alive} of ${status.nodes.length}`, shards: fmt.count(status.shards),
      unowned: status.unowned.length ? shardRanges(status.unowned) : 'none', takeovers: fmt.count(status.takeovers),
      store: status.store,
    });
    setText(problem, status.last_error || '');
    problem.hidden = !status.last_error;
    nodes.update(status.nodes);
    local.update(status.local);
  }

  return {title: 'Cluster', root, refresh};
}
