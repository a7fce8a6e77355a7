// The dashboard's entry point: sign-in, hash routes, and the poll loop that keeps the current view live.
//
// Invariants:
// - Polls run one at a time, every POLL_MS while the tab is visible, and not at all while it is hidden (an idle
//   background tab costs the broker nothing); a poll answered after the view changed is ignored.
// - A 401 from any request returns to the sign-in form; a 403 is shown in words and the page stays usable.
// - Routes are hashes (#/queues/NAME), so every page has a link and the back button works.

import {api, ApiError, getToken, onUnauthenticated, setToken} from './api.js';
import {field, h, setText} from './dom.js';
import {actionForm, errorText} from './ui.js';
import {overviewView} from './view_overview.js';
import {queuesView} from './view_queues.js';
import {queueView} from './view_queue.js';
import {topicsView} from './view_topics.js';
import {topicView} from './view_topic.js';
import {connectionsView} from './view_connections.js';
import {clusterView} from './view_cluster.js';

const POLL_MS = 1500;

// [path pattern (its groups are the view's arguments), view, the navigation entry it belongs to]
const ROUTES = [
  [/^\/?$/, overviewView, 'overview'],
  [/^\/queues$/, queuesView, 'queues'],
  [/^\/queues\/([^/]+)$/, queueView, 'queues'],
  [/^\/topics$/, topicsView, 'topics'],
  [/^\/topics\/([^/]+)$/, topicView, 'topics'],
  [/^\/connections$/, connectionsView, 'connections'],
  [/^\/cluster$/, clusterView, 'cluster'],
];

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const banner = document.getElementById('banner');
const userBox = document.getElementById('user');

const state = {user: null, view: null, generation: 0, timer: null, polling: false, pollAgain: false};

function showBanner(text) {
  setText(banner, text || '');
  banner.hidden = !text;
}

const ctx = {
  api,
  navigate(hash) {
    window.location.hash = hash;
  },
  /** Poll the current view now (after an action changed something). */
  refresh() {
    schedule(0);
  },
  get user() {
    return state.user;
  },
};

function parseRoute() {
  const path = window.location.hash.replace(/^#/, '') || '/';
  for (const [pattern, view, section] of ROUTES) {
    const m = path.match(pattern);
    if (m) {
      let params;
      try {
        params = m.slice(1).map(decodeURIComponent);
      } catch {
        return null;
      }
      return {view, params, section};
    }
  }
  return null;
}

function setCurrentNav(section) {
  for (const link of nav.querySelectorAll('a')) {
    if (link.dataset.section === section) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function render(focusHeading) {
  if (!state.user) return;
  if (state.view && state.view.dispose) state.view.dispose();
  state.generation += 1;
  showBanner('');
  const route = parseRoute();
  if (!route) {
    state.view = null;
    setCurrentNav(null);
    document.title = 'Not found · Chute';
    main.replaceChildren(h('h1', {tabindex: '-1'}, 'Page not found'),
      h('p', {}, 'There is no such page. ', h('a', {href: '#/'}, 'Go to the overview.')));
    if (focusHeading) main.querySelector('h1').focus();
    return;
  }
  state.view = route.view(ctx, ...route.params);
  setCurrentNav(route.section);
  document.title = `${state.view.title} · Chute`;
  main.replaceChildren(state.view.root);
  if (focusHeading) {
    const heading = main.querySelector('h1');
    if (heading) {
      heading.setAttribute('tabindex', '-1');
      heading.focus();
    }
  }
  schedule(0);
}

function schedule(delay) {
  clearTimeout(state.timer);
  state.timer = null;
  if (document.visibilityState === 'hidden' || !state.user) return;
  state.timer = setTimeout(poll, delay);
}

async function poll() {
  state.timer = null;
  if (state.polling) {
    state.pollAgain = true;
    return;
  }
  const view = state.view;
  const generation = state.generation;
  if (!view || !view.refresh) return;
  state.polling = true;
  try {
    await view.refresh(() => generation === state.generation);
    if (generation === state.generation) showBanner('');
  } catch (err) {
    if (generation === state.generation && !(err instanceof ApiError && err.status === 401)) {
      showBanner(`${errorText(err)}${err.status === 403 ? '' : ' (retrying)'}`);
    }
  } finally {
    state.polling = false;
  }
  const again = state.pollAgain || generation !== state.generation;
  state.pollAgain = false;
  schedule(again ? 0 : POLL_MS);
}

// The Cluster entry shows only on a cluster node (chute serve --store); the page itself works on any broker.
async function showClusterLink() {
  try {
    const status = await api('GET', '/cluster');
    document.getElementById('nav-cluster').hidden = !status.enabled;
  } catch {
    // an older broker without the route, or a failed request: the entry stays hidden
  }
}

function showUser(user) {
  const parts = [h('span', {class: 'who'}, 'Signed in as ', h('strong', {}, user.name))];
  if (!user.auth_enabled) parts.push(h('span', {class: 'hint'}, ' (auth is off)'));
  if (user.auth_enabled) {
    parts.push(h('button', {type: 'button', class: 'secondary', onclick: signOut}, 'Sign out'));
  }
  userBox.replaceChildren(...parts);
}

function signOut() {
  setToken(null);
  showLogin('You have signed out.');
}

function showLogin(message) {
  state.user = null;
  if (state.view && state.view.dispose) state.view.dispose();
  state.view = null;
  state.generation += 1;
  clearTimeout(state.timer);
  nav.hidden = true;
  userBox.replaceChildren();
  showBanner('');
  document.title = 'Sign in · Chute';
  const user = h('input', {name: 'user', autocomplete: 'username', required: true});
  const password = h('input', {name: 'password', type: 'password', autocomplete: 'current-password', required: true});
  const form = h('form', {class: 'card login', 'aria-labelledby': 'login-title'},
    h('h1', {id: 'login-title', tabindex: '-1'}, 'Sign in to Chute'),
    message ? h('p', {class: 'notice', role: 'status'}, message) : null,
    field('User', user),
    field('Password', password),
    h('div', {class: 'buttons'}, h('button', {type: 'submit'}, 'Sign in')));
  actionForm(form, async () => {
    const reply = await api('POST', '/login', {user: user.value, password: password.value});
    setToken(reply.token);
    password.value = '';
    await start(true);
    return 'Signed in.';
  });
  main.replaceChildren(form);
  user.focus();
}

async function start(focus) {
  let whoami;
  try {
    whoami = await api('GET', '/whoami');
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      const hadToken = Boolean(getToken());
      setToken(null);
      showLogin(hadToken ? `Please sign in again (${err.message}).` : null);
      return;
    }
    nav.hidden = true;
    main.replaceChildren(h('h1', {}, 'Cannot load the dashboard'),
      h('p', {role: 'alert', class: 'outcome error'}, errorText(err)),
      h('button', {type: 'button', onclick: () => start(true)}, 'Try again'));
    return;
  }
  state.user = whoami;
  nav.hidden = false;
  showClusterLink();
  showUser(whoami);
  render(focus);
}

// A 401 while signed in (the session expired, or the user was removed): back to the sign-in form. Before sign-in
// (a wrong password) the form itself shows the error.
onUnauthenticated((err) => {
  if (state.user === null) return;
  setToken(null);
  showLogin(`Please sign in again (${err.message}).`);
});

window.addEventListener('hashchange', () => render(true));
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible') schedule(0);
  else {
    clearTimeout(state.timer);
    state.timer = null;
  }
});
document.getElementById('skip').addEventListener('click', (event) => {
  event.preventDefault();
  main.focus();
});

start(false);
