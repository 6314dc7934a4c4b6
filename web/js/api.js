// Talking to jobd: JSON requests and server-sent event streams, both with the bearer token the
// user pasted (kept in localStorage, sent as an Authorization header; jobd sets no cookies, so a
// page on another site cannot make requests in the user's name).

const TOKEN_KEY = 'jobd.token';
const PREFIX = '/api/v1';

export function token() {
  return localStorage.getItem(TOKEN_KEY) || '';
}

export function setToken(t) {
  if (t) localStorage.setItem(TOKEN_KEY, t);
  else localStorage.removeItem(TOKEN_KEY);
}

let tokenRejected = () => {};
/**
 * Registers what to do when jobd answers 401 to a request sent with the saved token: it was
 * revoked, or the daemon's configuration changed.
 */
export function onTokenRejected(f) {
  tokenRejected = f;
}

function headers(extra = {}, tok = token()) {
  const h = { ...extra };
  if (tok) h.Authorization = `Bearer ${tok}`;
  return h;
}

/** An error answer of the API: `{"error": {"code", "message"}}`. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function errorOf(res) {
  const text = await res.text().catch(() => '');
  try {
    const e = JSON.parse(text).error;
    return new ApiError(res.status, e.code, e.message);
  } catch {
    return new ApiError(res.status, `http_${res.status}`, text || res.statusText);
  }
}

/** A JSON request to `/api/v1{path}`; throws ApiError on a 4xx/5xx answer. */
export async function api(path, { method = 'GET', body, tok } = {}) {
  const sent = tok ?? token();
  const init = { method, cache: 'no-store', headers: headers({}, sent) };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(PREFIX + path, init);
  if (res.status === 401 && tok === undefined && token()) tokenRejected();
  if (!res.ok) {
    const err = await errorOf(res);
    // Whether the request carried the saved token: a 401 for it is the page's to handle
    // once, even when another request's 401 has already forgotten the token.
    err.savedToken = tok === undefined && Boolean(sent);
    throw err;
  }
  return res.status === 204 ? null : res.json();
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Follows a server-sent event stream with fetch (EventSource cannot send a token) and calls
 * `handlers[event](data)` for each message; `handlers.open()` on every (re)connection, when the
 * server starts again from its current state. Reconnects with backoff after a dropped
 * connection; `onState('live' | 'reconnecting' | 'error', err)` tells the page.
 */
export function subscribe(path, handlers, onState = () => {}) {
  let closed = false;
  let ctrl = null;
  (async () => {
    let delay = 500;
    while (!closed) {
      ctrl = new AbortController();
      try {
        const res = await fetch(PREFIX + path, {
          headers: headers({ Accept: 'text/event-stream' }),
          cache: 'no-store',
          signal: ctrl.signal,
        });
        if (res.status === 401 && token()) tokenRejected();
        if (!res.ok) throw await errorOf(res);
        handlers.open?.();
        onState('live');
        delay = 500;
        await readEvents(res.body, handlers);
      } catch (e) {
        if (closed) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) {
          onState('error', e);
          return; // Not found or not allowed: retrying will not help.
        }
      }
      if (closed) return;
      onState('reconnecting');
      await sleep(delay);
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return {
    close() {
      closed = true;
      ctrl?.abort();
    },
  };
}

async function readEvents(body, handlers) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let name = 'message';
      const data = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) name = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
      }
      if (data.length && handlers[name]) handlers[name](JSON.parse(data.join('\n')));
    }
  }
}

/**
 * Follows a job's log (`/jobs/{id}/logs?follow=true`, chunked text) and calls `onText` with
 * each chunk until the job has finished and everything is sent; resolves then.
 */
export async function followLog(id, stream, onText, signal) {
  const res = await fetch(
    `${PREFIX}/jobs/${id}/logs?stream=${stream}&follow=true&tail=65536`,
    { headers: headers(), cache: 'no-store', signal },
  );
  if (!res.ok) throw await errorOf(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(value);
  }
}
