// The queue view: one page of jobs from `GET /queue` (filters, sort and page live in the URL
// hash), fetched again when the server pushes "the queue changed"; progress pushes update
// their rows in place.

import { api } from './api.js';
import { bytes, coalesced, duration, el, Eta, num, stateBadge } from './util.js';

const PAGE = 50;

export class QueueView {
  constructor(ctx) {
    this.ctx = ctx;
    this.table = document.querySelector('#queue');
    this.body = this.table.tBodies[0];
    this.params = {};
    this.rows = new Map(); // id -> {job, cells}
    this.eta = new Eta();
    this.rendered = false;
    /** Fetches the page again; calls during a fetch coalesce into one more fetch after it. */
    this.refresh = coalesced(() => this.load());

    this.mine = document.querySelector('#f-mine');
    this.state = document.querySelector('#f-state');
    this.owner = document.querySelector('#f-owner');
    this.mine.addEventListener('change', () => this.go({ mine: this.mine.checked ? '1' : '', page: '' }));
    this.state.addEventListener('change', () => this.go({ state: this.state.value, page: '' }));
    this.owner.addEventListener('change', () => this.go({ owner: this.owner.value.trim(), page: '' }));
    document.querySelector('#page-prev').addEventListener('click', () => this.go({ page: String(Math.max(0, this.page() - 1)) }));
    document.querySelector('#page-next').addEventListener('click', () => this.go({ page: String(this.page() + 1) }));
    for (const th of this.table.querySelectorAll('th[data-sort]')) {
      th.tabIndex = 0;
      const sort = () => {
        const key = th.dataset.sort;
        const same = (this.params.sort || 'id') === key;
        this.go({ sort: key, order: same ? (this.order() === 'asc' ? 'desc' : 'asc') : '', page: '' });
      };
      th.addEventListener('click', sort);
      th.addEventListener('keydown', (e) => { if (e.key === 'Enter') sort(); });
    }
  }

  page() {
    return Number(this.params.page || 0);
  }

  /** The order in force: the URL's, else what the server uses for this key. */
  order() {
    if (this.params.order) return this.params.order;
    return ['id', 'priority', 'gpus', 'vram', 'age'].includes(this.params.sort || 'id') ? 'desc' : 'asc';
  }

  go(change) {
    const p = { ...this.params, ...change };
    const q = new URLSearchParams(Object.entries(p).filter(([, v]) => v));
    location.hash = `#/${q.toString() ? `?${q}` : ''}`;
  }

  /** After the caller is known: "mine" needs a user. */
  setUser() {
    this.mine.disabled = !this.ctx.user;
    this.mine.parentElement.title = this.ctx.user ? '' : 'add a token to see your jobs';
    if (this.params.mine === '1') this.refresh();
  }

  show(params) {
    this.params = params;
    this.mine.checked = params.mine === '1';
    this.mine.disabled = !this.ctx.user;
    this.state.value = params.state || '';
    this.owner.value = params.owner || '';
    for (const th of this.table.querySelectorAll('th[data-sort]')) {
      const on = (params.sort || 'id') === th.dataset.sort;
      th.setAttribute('aria-sort', on ? (this.order() === 'asc' ? 'ascending' : 'descending') : 'none');
    }
    this.refresh();
  }

  query() {
    const p = this.params;
    const q = new URLSearchParams({ limit: PAGE, offset: this.page() * PAGE });
    if (p.state === 'all') q.set('all', 'true');
    else if (p.state) q.set('state', p.state);
    if (p.owner) q.set('owner', p.owner);
    if (p.mine === '1' && this.ctx.user) q.set('mine', 'true');
    if (p.sort) q.set('sort', p.sort);
    if (p.order) q.set('order', p.order);
    return q;
  }

  /** Fetches the page again. */
  async load() {
    try {
      const resp = await api(`/queue?${this.query()}`);
      this.table.classList.remove('stale');
      this.render(resp);
    } catch (e) {
      // What is on screen may no longer be true (the daemon is stopping, say): say so.
      this.table.classList.add('stale');
      // A refused saved token is handled once for the whole page (main.js).
      if (!(e.status === 401 && e.savedToken)) {
        console.error(e);
        this.ctx.toast(`Cannot load the queue: ${e.message}`, true);
      }
    }
  }

  render(resp) {
    this.ctx.setCounts(resp.counts);
    this.rows.clear();
    const now = Date.now();
    this.body.replaceChildren(...resp.jobs.map((j) => this.row(j, now)));
    document.querySelector('#queue-empty').hidden = resp.jobs.length > 0;
    const from = resp.total ? resp.offset + 1 : 0;
    const to = resp.offset + resp.jobs.length;
    document.querySelector('#page-info').textContent = `${from}–${to} of ${resp.total.toLocaleString()}`;
    document.querySelector('#page-prev').disabled = resp.offset === 0;
    document.querySelector('#page-next').disabled = to >= resp.total;
    if (!this.rendered && resp.jobs.length) {
      this.rendered = true;
      // After the next frame: when the rows are on screen, not just in the DOM.
      requestAnimationFrame(() => performance.mark('jobd:queue-rendered'));
    }
  }

  row(job, now) {
    this.eta.observe(job.id, job.progress, now);
    const cells = {
      progress: el('td', { class: 'progress', 'data-label': 'Progress' }),
      eta: el('td', { class: 'eta', 'data-label': 'ETA' }),
      age: el('td', { class: 'age', 'data-label': 'Age' }),
    };
    let gpus = 'CPU';
    if (job.gpus > 0) {
      const on = job.gpu_indices || []; // absent unless the job holds GPUs
      gpus = on.length ? `${job.gpus} · #${on.join(',')}` : String(job.gpus);
    }
    let vram = '—';
    if (job.whole_gpu) vram = 'whole GPU';
    else if (job.vram_per_gpu !== undefined) vram = bytes(job.vram_per_gpu) + (job.gpus > 1 ? ' each' : '');
    const why = job.waiting || (job.state === 'queued' ? '' : job.reason) || '';
    const tr = el('tr', { dataset: { id: job.id, state: job.state } },
      el('td', { class: 'id', 'data-label': 'ID' }, el('a', { href: `#/job/${job.id}` }, `#${job.id}`)),
      el('td', { class: 'name', 'data-label': 'Name' }, el('a', { href: `#/job/${job.id}` }, job.name),
        job.sweep ? el('a', { class: 'sweep-tag', href: `#/sweep/${job.sweep}`, title: `compare the jobs of sweep ${job.sweep}` }, `sweep ${job.sweep}`) : null),
      el('td', { 'data-label': 'State' }, stateBadge(job.state, job.stopping)),
      el('td', { 'data-label': 'Owner' }, job.owner),
      el('td', { class: 'num', 'data-label': 'Priority' }, job.priority),
      el('td', { 'data-label': 'Kind' }, job.kind),
      el('td', { 'data-label': 'GPUs' }, gpus),
      el('td', { class: 'num', 'data-label': 'VRAM' }, vram),
      cells.progress, cells.eta, cells.age,
      el('td', { class: job.waiting ? 'why waiting' : 'why', 'data-label': 'Why', title: why }, why));
    tr.addEventListener('click', (e) => {
      if (!e.target.closest('a')) location.hash = `#/job/${job.id}`;
    });
    this.rows.set(job.id, { job, cells });
    this.fill(job, cells, now);
    return tr;
  }

  fill(job, cells, now) {
    const p = job.progress;
    if (p && p.total_steps) {
      const frac = Math.min(1, p.step / p.total_steps);
      const bar = el('div', { class: 'pbar' }, el('div', {}));
      bar.firstChild.style.width = `${(100 * frac).toFixed(1)}%`;
      const loss = p.loss !== undefined ? ` · loss ${num(p.loss, 3)}` : '';
      cells.progress.replaceChildren(bar, el('span', { class: 'ptext' },
        `${p.step}/${p.total_steps} · ${(100 * frac).toFixed(0)}%${loss}`));
    } else {
      cells.progress.replaceChildren();
    }
    const left = this.eta.left(job, now);
    cells.eta.textContent = left === undefined ? '' : duration(left);
    cells.age.textContent = duration(now - job.submitted_at);
    cells.age.title = new Date(job.submitted_at).toLocaleString();
  }

  /** A `progress` push: update the row in place. */
  progress({ id, progress }) {
    const r = this.rows.get(id);
    this.eta.observe(id, progress);
    if (!r) return;
    r.job.progress = progress;
    this.fill(r.job, r.cells, Date.now());
  }

  /** Re-renders relative times (age, ETA); local only, no request. */
  tick() {
    const now = Date.now();
    for (const { job, cells } of this.rows.values()) {
      cells.age.textContent = duration(now - job.submitted_at);
      const left = this.eta.left(job, now);
      cells.eta.textContent = left === undefined ? '' : duration(left);
    }
  }
}
