// The HTTP API client of the dashboard (docs/http-api.md): JSON in and out, the session token as a Bearer header.
// Invariants: the token lives only in sessionStorage (no cookies, so no CSRF); every failed request throws an
// ApiError carrying the API's own `error.message`; a 401 also calls the registered handler (back to login).

const TOKEN_KEY = 'chute.dashboard.token';
let unauthenticatedHandler = () => {};

export class ApiError extends Error {
  constructor(status, message, name) {
    super(message);
    this.status = status;
    this.errorName = name || null;
  }
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export function onUnauthenticated(handler) {
  unauthenticatedHandler = handler;
}

/** Path segment for a queue or topic name. */
export const seg = (name) => encodeURIComponent(name);

/** Call the API: api('GET', '/queues'); returns the parsed JSON body, or null for 204. */
export async function api(method, path, body) {
  const headers = {Accept: 'application/json'};
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  const init = {method, headers, cache: 'no-store', credentials: 'omit'};
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`/api/v1${path}`, init);
  } catch (err) {
    throw new ApiError(0, `cannot reach the broker (${err.message})`, 'network');
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = data && data.error;
    const message = (error && error.message) || `${response.status} ${response.statusText || 'error'}`.trim();
    const err = new ApiError(response.status, message, error && error.name);
    if (response.status === 401) unauthenticatedHandler(err);
    throw err;
  }
  return data;
}
