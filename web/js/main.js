// The dashboard's shell: routes (`#/?filters` = queue, `#/job/ID` = one job), the header
// (counts by state, live indicator, token), and the one stream every page shares
// (`/api/v1/stream`: GPUs, "the queue changed", progress).

import { api, onTokenRejected, setToken, subscribe, token } from './api.js';
import { renderGpus } from './gpus.js';
import { JobPage } from './job.js';
import { QueueView } from './queue.js';
import { SchedulesView } from './schedules.js';
import { SweepPage } from './sweep.js';
import { el } from './util.js';

const $ = (s) => document.querySelector(s);

const live = new Map(); // stream name -> state
let toastTimer = null;

const ctx = {
  user: null,
  toast(text, error = false) {
    const t = $('#toast');
    t.textContent = text;
    t.classList.toggle('error', error);
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, error ? 8000 : 3000);
  },
  setLive(name, state) {
    if (state) live.set(name, state);
    else live.delete(name);
    const states = [...live.values()];
    let shown = 'live';
    if (states.includes('error')) shown = 'error';
    else if (states.some((s) => s !== 'live')) shown = 'reconnecting';
    const l = $('#live');
    l.dataset.state = shown;
    l.textContent = { live: 'live', reconnecting: 'reconnecting…', error: 'error' }[shown];
  },
  setCounts(counts) {
    const order = ['running', 'starting', 'publishing', 'queued', 'interrupted', 'failed', 'cancelled', 'succeeded'];
    const byState = new Map(counts);
    $('#counts').replaceChildren(...order.filter((s) => byState.get(s)).map((s) => el('a', {
      class: `count state-${s}`,
      href: `#/?state=${s === 'running' ? 'starting,running,publishing' : s}`,
      title: `show ${s} jobs`,
    }, `${byState.get(s)} ${s}`)));
  },
};

const queue = new QueueView(ctx);
const schedules = new SchedulesView(ctx);
const jobPage = new JobPage(ctx, $('#job-page'));
const sweepPage = new SweepPage(ctx, $('#sweep-page'));

function route() {
  const hash = location.hash || '#/';
  const m = hash.match(/^#\/job\/(\d+)/);
  const sw = hash.match(/^#\/sweep\/(\d+)/);
  $('#queue-page').hidden = Boolean(m || sw);
  $('#job-page').hidden = !m;
  $('#sweep-page').hidden = !sw;
  if (!m) jobPage.hide();
  if (!sw) sweepPage.hide();
  if (m) {
    jobPage.show(Number(m[1]));
    document.title = `jobd · job ${m[1]}`;
    return;
  }
  if (sw) {
    sweepPage.show(Number(sw[1]));
    document.title = `jobd · sweep ${sw[1]}`;
    return;
  }
  const q = hash.indexOf('?') >= 0 ? hash.slice(hash.indexOf('?') + 1) : '';
  queue.show(Object.fromEntries(new URLSearchParams(q)));
  schedules.refresh();
  document.title = 'jobd';
}

let shared = null;
function connect() {
  shared?.close();
  shared = subscribe('/stream', {
    gpus: (g) => renderGpus($('#gpu-list'), g),
    queue: (q) => {
      ctx.setCounts(q.counts);
      if (!$('#queue-page').hidden) {
        queue.refresh();
        schedules.refresh();
      }
      if (!$('#sweep-page').hidden) sweepPage.poke();
    },
    progress: (p) => {
      queue.progress(p);
      if (!$('#sweep-page').hidden) sweepPage.poke(p.id);
    },
  }, (state, err) => {
    ctx.setLive('queue', state);
    if (state === 'error' && err.status !== 401) ctx.toast(`Live updates stopped: ${err.message}`, true);
  });
}

async function whoami() {
  try {
    const me = await api('/whoami');
    ctx.user = me.user;
    ctx.admin = Boolean(me.admin);
  } catch (e) {
    ctx.user = null;
    ctx.admin = false;
    if (e.status === 401 && token()) {
      // A saved token jobd no longer knows (revoked, or the daemon's config changed) would
      // make every request fail, reads included: forget it and carry on read-only.
      setToken('');
      ctx.toast('Your saved token is no longer valid, so it was forgotten: showing the read-only view. Add a new token to act on your jobs.', true);
    } else if (e.status === 401) {
      ctx.toast(e.message, true);
    }
  }
  const b = $('#token-button');
  b.textContent = ctx.user ? `● ${ctx.user}` : 'Read-only · add token';
  b.classList.toggle('signed-in', Boolean(ctx.user));
  b.title = ctx.user ? 'Signed in with a token: change or forget it' : 'Add a token to act on your jobs';
}

function tokenDialog() {
  const d = $('#token-dialog');
  const input = $('#token-input');
  const error = $('#token-error');
  const open = () => {
    input.value = '';
    error.hidden = true;
    d.showModal();
    input.focus();
  };
  const apply = async () => {
    await whoami();
    connect();
    route();
  };
  $('#token-button').addEventListener('click', open);
  $('#token-cancel').addEventListener('click', () => d.close());
  $('#token-forget').addEventListener('click', async () => {
    setToken('');
    d.close();
    await apply();
  });
  const save = async () => {
    const t = input.value.trim();
    if (!t) return;
    try {
      await api('/whoami', { tok: t }); // checks the token before keeping it
    } catch (e) {
      error.textContent = e.status === 401 ? 'jobd does not know this token.' : e.message;
      error.hidden = false;
      return;
    }
    setToken(t);
    d.close();
    await apply();
  };
  $('#token-save').addEventListener('click', save);
  input.addEventListener('keydown', (e) => { if (e.key === 'Enter') save(); });
}

tokenDialog();
// The saved token was refused (revoked while the page was open): whoami forgets it, and the
// page starts again read-only.
let rechecking = false;
onTokenRejected(() => {
  if (rechecking) return;
  rechecking = true;
  whoami().then(() => {
    connect();
    route();
    queue.setUser();
  }).finally(() => { rechecking = false; });
});
window.addEventListener('hashchange', route);
// A background tab lets go of its streams: browsers allow only six HTTP/1.1 connections per
// host, and each visible page holds two or three. Coming back resyncs from scratch.
document.addEventListener('visibilitychange', () => {
  if (document.hidden) {
    shared?.close();
    shared = null;
    jobPage.hide();
    sweepPage.hide();
  } else {
    connect();
    route();
  }
});
// Relative times (age, ETA) move on by themselves: re-render them each second, locally.
setInterval(() => {
  if (!$('#queue-page').hidden) queue.tick();
  else jobPage.tick();
}, 1000);
// Who the token belongs to comes first: a stale one is dropped before the page uses it.
whoami().then(() => {
  connect();
  route();
  queue.setUser();
});
