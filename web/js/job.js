// The job view: everything about one job, kept current by its event stream
// (`/jobs/{id}/stream`: the job, its events, metrics, checkpoints, progress) and its log
// (`/jobs/{id}/logs?follow=true`). Charts are uPlot (web/vendor/uplot).

import { api, followLog, subscribe } from './api.js';
import { axisNum, bytes, duration, el, Eta, num, stateBadge, time } from './util.js';

const TERMINAL = ['succeeded', 'failed', 'cancelled'];

let uplot = null;
/** Loads uPlot on the first job or sweep page, keeping it off the queue view's first render. */
export function loadUplot() {
  uplot ??= new Promise((resolve, reject) => {
    document.head.append(el('link', { rel: 'stylesheet', href: 'vendor/uplot/uPlot.min.css' }));
    document.head.append(el('script', {
      src: 'vendor/uplot/uPlot.iife.min.js',
      onload: () => resolve(window.uPlot),
      onerror: () => { uplot = null; reject(new Error('the chart library did not load')); },
    }));
  });
  return uplot;
}
const LOG_KEEP = 256 * 1024; // characters of log kept on the page

/** A line chart of metrics against step. */
export class Chart {
  constructor(container, title, series, { log = false, tight = false } = {}) {
    this.container = container;
    this.series = series; // [{label, key, points}]
    this.log = log;
    const css = getComputedStyle(document.documentElement);
    const fg = css.getPropertyValue('--fg').trim() || '#222';
    const grid = css.getPropertyValue('--grid').trim() || '#ddd';
    const axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } };
    // Steps are whole numbers: no ticks at 12.5.
    const stepIncrs = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2.5e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];
    this.plot = new window.uPlot({
      title,
      width: Math.max(240, container.clientWidth),
      height: 200,
      // A loss falls by orders of magnitude: on a linear axis its tail lies flat on 0.
      // `tight`: the y axis spans the data (padded 5%), not whole powers of ten, so close
      // curves stay apart.
      scales: {
        x: { time: false },
        y: {
          ...(log ? { distr: 3 } : {}),
          ...(tight ? { range: (u, min, max) => (min == null ? [1, 10] : [min / 1.05, max * 1.05]) } : {}),
        },
      },
      axes: [
        { ...axis, label: 'step', incrs: stepIncrs },
        { ...axis, size: 60, values: (u, splits) => splits.map(axisNum) },
      ],
      series: [{ label: 'step' }, ...series.map((s) => ({
        label: s.label,
        stroke: s.colour,
        width: 2,
        spanGaps: true,
        points: { show: s.points, size: 6, fill: s.colour },
        // The legend shows the value at the cursor, else the series' latest one (a step that
        // logged only an eval loss has no train loss, and uPlot would show "--"), in
        // significant digits: a loss of 1.6e-4 is not "0".
        value: (u, v, si, idx) => {
          let x = v;
          for (let i = idx ?? -1; x == null && i >= 0; i -= 1) x = u.data[si][i];
          return x == null ? '--' : num(x);
        },
      }))],
    }, [[], ...series.map(() => [])], container);
    this.resize = new ResizeObserver(() => {
      const w = Math.max(240, this.container.clientWidth);
      if (w !== this.plot.width) {
        this.plot.setSize({ width: w, height: 200 });
        this.showLatest(); // a resize clears the legend
      }
    });
    this.resize.observe(container);
  }

  set(records) {
    // A log axis cannot show 0 or less: such points are left out.
    const value = (r, key) => {
      const v = r[key] ?? null;
      return this.log && v !== null && v <= 0 ? null : v;
    };
    const data = [records.map((r) => r.step), ...this.series.map((s) => records.map((r) => value(r, s.key)))];
    this.plot.setData(data);
    // Without the cursor on the chart, the legend shows the latest values (again after the
    // redraw uPlot defers: a chart made and filled at once would otherwise show "--").
    this.showLatest();
    requestAnimationFrame(() => this.showLatest());
    // How many points each series has, for people with screen readers and for the tests.
    this.container.dataset.points = this.series
      .map((s, i) => data[i + 1].filter((v) => v !== null).length).join(',');
  }

  /** Without the cursor on the chart, the legend shows the latest values. */
  showLatest() {
    const n = this.plot.data[0].length;
    if (n && this.plot.cursor.idx == null) this.plot.setLegend({ idx: n - 1 });
  }

  destroy() {
    this.resize.disconnect();
    this.plot.destroy();
  }
}

export class JobPage {
  constructor(ctx, root) {
    this.ctx = ctx;
    this.root = root;
    this.eta = new Eta();
  }

  show(id) {
    this.hide();
    this.gen = (this.gen || 0) + 1; // tells late callbacks of an earlier show() apart
    this.id = id;
    this.job = null;
    this.metrics = [];
    this.charts = null;
    this.logTab = 'stdout';
    this.build();
    this.stream = subscribe(`/jobs/${id}/stream`, {
      open: () => this.events.replaceChildren(),
      job: (j) => this.onJob(j),
      event: (e) => this.onEvent(e),
      metrics: (m) => this.onMetrics(m),
      progress: (p) => this.onProgress(p.progress),
      checkpoints: (c) => this.onCheckpoints(c),
    }, (state, err) => {
      this.ctx.setLive(`job ${id}`, state);
      if (state === 'error') this.title.textContent = `Job ${id}: ${err.message}`;
    });
  }

  hide() {
    this.stream?.close();
    this.stream = null;
    this.ctx.setLive(`job ${this.id}`, null);
    this.logAbort?.abort();
    if (this.charts) for (const c of this.charts) c.destroy();
    this.charts = null;
  }

  build() {
    const section = (title, ...body) => el('section', { class: 'panel' }, el('h2', {}, title), ...body);
    this.title = el('h1', {}, `Job ${this.id}`);
    this.badge = el('span');
    this.meta = el('p', { class: 'meta' });
    this.sweepLine = el('p', { class: 'meta' });
    this.cancelBtn = el('button', { type: 'button', id: 'act-cancel', onclick: () => this.cancel() }, 'Cancel');
    this.requeueBtn = el('button', { type: 'button', id: 'act-requeue', onclick: () => this.act('requeue', {}, 'Requeue') }, 'Requeue');
    // Its job file again, as a new job of its owner (any state: a succeeded one too).
    this.resubmitBtn = el('button', { type: 'button', id: 'act-resubmit', onclick: () => this.resubmit() }, 'Run again');
    // A queued job may be held (it keeps its place but does not start) and released.
    this.holdBtn = el('button', {
      type: 'button', id: 'act-hold',
      onclick: () => (this.job && this.job.held_by ? this.act('release', {}, 'Release') : this.act('hold', {}, 'Hold')),
    }, 'Hold');
    this.prioInput = el('input', { type: 'number', id: 'act-priority-value', step: 1, min: -1000, max: 1000, 'aria-label': 'new priority' });
    this.prioBtn = el('button', { type: 'button', id: 'act-priority', onclick: () => this.setPriority() }, 'Set priority');
    this.actHint = el('p', { class: 'muted hint' });
    this.progress = el('div', { class: 'job-progress' });
    this.explain = el('div', { class: 'explain' });
    this.chartBox = el('div', { class: 'charts' });
    this.published = el('div');
    this.checkpoints = el('div');
    this.events = el('tbody');
    this.source = el('pre', { class: 'source' });
    this.log = el('pre', { class: 'log', id: 'log', tabindex: 0 });
    this.logNote = el('p', { class: 'muted' });
    const tab = (name) => el('button', {
      type: 'button', class: 'tab', dataset: { stream: name }, onclick: () => this.startLog(name),
    }, name);
    // What the job's [notify] command printed: shown for jobs that have one.
    this.notifyTab = tab('notify');
    this.notifyTab.hidden = true;
    this.tabs = el('div', { class: 'tabs', role: 'tablist' }, tab('stdout'), tab('stderr'), this.notifyTab);
    this.root.replaceChildren(
      el('div', { class: 'job-head' },
        el('a', { href: '#/', class: 'back' }, '← queue'),
        el('div', { class: 'title-row' }, this.title, this.badge),
        this.meta,
        this.sweepLine,
        el('div', { class: 'actions' }, this.cancelBtn, this.requeueBtn, this.resubmitBtn, this.holdBtn,
          el('span', { class: 'prio' }, this.prioInput, this.prioBtn)),
        this.actHint),
      this.progress,
      this.explain,
      el('div', { class: 'job-grid' },
        el('div', { class: 'col' },
          section('Training', this.chartBox),
          section('Log', this.tabs, this.log, this.logNote)),
        el('div', { class: 'col' },
          section('Published model', this.published),
          section('Checkpoints', this.checkpoints),
          section('History', el('table', { class: 'events' },
            el('thead', {}, el('tr', {}, el('th', {}, 'time'), el('th', {}, 'state'), el('th', {}, 'reason'))),
            this.events)),
          section('Job file', this.source))));
    this.startLog('stdout');
  }

  onJob(job) {
    const was = this.job;
    this.job = job;
    if (job.progress) this.eta.observe(job.id, job.progress);
    this.title.textContent = `#${job.id} ${job.name}`;
    this.badge.replaceChildren(stateBadge(job.state, job.stop && !TERMINAL.includes(job.state)));
    const placement = job.placement && job.placement.gpus.length
      ? `GPU ${job.placement.gpus.map((g) => g.index).join(', ')} (${bytes(job.placement.vram_per_gpu)}${job.placement.gpus.length > 1 ? ' each' : ''})`
      : (job.spec.resources.gpus ? `${job.spec.resources.gpus} GPU` : 'CPU');
    const parts = [
      `owner ${job.owner.user}`, job.kind, `priority ${job.priority}`, placement,
      `submitted ${time(job.submitted_at)}`,
      job.started_at ? `started ${time(job.started_at)}` : null,
      job.finished_at ? `finished ${time(job.finished_at)}` : null,
      job.attempts ? `attempt ${job.attempts}` : null,
      job.vram_peak ? `peak memory ${bytes(job.vram_peak)}` : null,
      job.held_by ? `held by ${job.held_by}` : null,
    ];
    this.meta.textContent = parts.filter(Boolean).join(' · ');
    const s = job.sweep;
    this.sweepLine.replaceChildren(...(s ? [
      el('a', { href: `#/sweep/${s.id}`, id: 'sweep-link' }, `sweep ${s.id}`),
      `, job ${s.index} of ${s.size}: ${s.values.map((v) => `${v.key}=${v.value}`).join(', ')}`,
    ] : []));
    const terminal = TERMINAL.includes(job.state);
    this.cancelBtn.disabled = terminal;
    this.requeueBtn.disabled = !['failed', 'cancelled'].includes(job.state);
    // Only its owner or an admin may: the copy runs as its owner.
    const mayRerun = Boolean(this.ctx.user) && (this.ctx.user === job.owner.user || this.ctx.admin);
    this.resubmitBtn.disabled = !mayRerun;
    this.resubmitBtn.title = mayRerun
      ? `Submit this job file again as a new job of ${job.owner.user}`
      : (this.ctx.user ? `Only ${job.owner.user} or an admin can run this job again` : 'Add a token to run your jobs again');
    this.holdBtn.textContent = job.held_by ? 'Release' : 'Hold';
    this.holdBtn.disabled = job.state !== 'queued';
    this.prioBtn.disabled = terminal;
    if (document.activeElement !== this.prioInput) this.prioInput.value = job.priority;
    this.actHint.textContent = this.ctx.user ? '' : 'Read-only: jobd refuses changes without a token (add one at the top).';
    this.source.textContent = job.source;
    this.notifyTab.hidden = !job.spec.notify;
    this.renderProgress();
    this.renderPublished();
    if (job.kind === 'train' && !this.charts) this.makeCharts();
    if (job.kind !== 'train') this.chartBox.replaceChildren(el('p', { class: 'muted' }, 'A command job: no training metrics.'));
    // A requeued job runs again: follow its new output.
    if (was && TERMINAL.includes(was.state) && !terminal) this.startLog(this.logTab);
    this.updateExplain();
  }

  async updateExplain() {
    const job = this.job;
    if (!job || TERMINAL.includes(job.state)) {
      this.explain.replaceChildren();
      return;
    }
    try {
      const ex = await api(`/jobs/${job.id}/explain`);
      if (this.job !== job) return;
      this.explain.replaceChildren(...ex.details.map((d) => el('p', {}, d)));
    } catch {
      this.explain.replaceChildren();
    }
  }

  renderProgress() {
    const job = this.job;
    const p = job?.progress;
    if (!p || !p.total_steps) {
      this.progress.replaceChildren();
      return;
    }
    const frac = Math.min(1, p.step / p.total_steps);
    const bar = el('div', { class: 'pbar big' }, el('div', {}));
    bar.firstChild.style.width = `${(100 * frac).toFixed(1)}%`;
    const left = this.eta.left(job);
    const text = [
      `step ${p.step} / ${p.total_steps} (${(100 * frac).toFixed(1)}%)`,
      p.stage, p.loss !== undefined ? `loss ${num(p.loss)}` : null,
      p.epoch !== undefined ? `epoch ${num(p.epoch, 2)}` : null,
      left !== undefined ? `ETA ${duration(left)}` : null,
    ].filter(Boolean).join(' · ');
    this.progress.replaceChildren(bar, el('p', { id: 'job-progress-text' }, text));
  }

  renderPublished() {
    const m = this.job.published;
    if (!m) {
      const planned = this.job.spec.publish ? 'Published to Ollama when training succeeds.' : 'Nothing published.';
      this.published.replaceChildren(el('p', { class: 'muted' }, planned));
      return;
    }
    const cmd = el('code', { id: 'ollama-run' }, m.run_command);
    const copy = el('button', {
      type: 'button',
      onclick: async () => {
        try {
          await navigator.clipboard.writeText(m.run_command);
          this.ctx.toast('Copied');
        } catch {
          getSelection().selectAllChildren(cmd); // no clipboard on plain http: select it instead
        }
      },
    }, 'copy');
    this.published.replaceChildren(
      el('p', {}, el('strong', {}, m.name), ` · ${m.quantization} · ${bytes(m.gguf_bytes)}`),
      el('p', { class: 'run' }, cmd, ' ', copy),
      el('p', { class: 'muted' }, `in ${m.models_dir}`),
      ...(m.not_exported ? [el('p', { class: 'muted' }, `Not in the GGUF: ${m.not_exported}`)] : []));
  }

  onEvent(e) {
    this.events.append(el('tr', {},
      el('td', { class: 'nowrap' }, time(e.at)), el('td', {}, stateBadge(e.state)), el('td', {}, e.reason)));
  }

  async makeCharts() {
    this.charts = [];
    const boxes = [el('div', { class: 'chart', id: 'chart-loss' }), el('div', { class: 'chart', id: 'chart-lr' }),
      el('div', { class: 'chart', id: 'chart-tps' })];
    this.chartBox.replaceChildren(...boxes);
    const gen = this.gen;
    try {
      await loadUplot();
    } catch (e) {
      this.chartBox.replaceChildren(el('p', { class: 'error' }, e.message));
      return;
    }
    if (this.gen !== gen) return; // the page moved on meanwhile
    this.charts = [
      new Chart(boxes[0], 'Loss', [
        { label: 'train loss', key: 'loss', colour: '#2f6feb', points: false },
        { label: 'eval loss', key: 'eval_loss', colour: '#d9480f', points: true },
      ], { log: true }),
      new Chart(boxes[1], 'Learning rate', [{ label: 'learning rate', key: 'learning_rate', colour: '#2b8a3e' }]),
      new Chart(boxes[2], 'Throughput', [{ label: 'tokens/s', key: 'tokens_per_second', colour: '#862e9c' }]),
    ];
    for (const c of this.charts) c.set(this.metrics);
  }

  onMetrics(m) {
    this.metrics = m.reset ? m.records : this.metrics.concat(m.records);
    if (this.charts) for (const c of this.charts) c.set(this.metrics);
  }

  onProgress(p) {
    if (!this.job) return;
    this.job.progress = p;
    this.eta.observe(this.job.id, p);
    this.renderProgress();
  }

  onCheckpoints(list) {
    if (!list.length) {
      this.checkpoints.replaceChildren(el('p', { class: 'muted' }, 'None yet.'));
      return;
    }
    this.checkpoints.replaceChildren(el('table', { class: 'checkpoints' },
      el('thead', {}, el('tr', {}, el('th', {}, 'step'), el('th', {}, 'size'), el('th', {}, 'saved'))),
      el('tbody', {}, list.map((c) => el('tr', {},
        el('td', { class: 'num' }, c.step), el('td', { class: 'num' }, bytes(c.bytes)), el('td', {}, time(c.modified)))))));
  }

  startLog(stream) {
    this.logAbort?.abort();
    const abort = new AbortController();
    this.logAbort = abort;
    this.logTab = stream;
    for (const t of this.tabs.children) t.setAttribute('aria-selected', String(t.dataset.stream === stream));
    this.log.textContent = '';
    this.logNote.textContent = 'following…';
    followLog(this.id, stream, (text) => {
      const stick = this.log.scrollTop + this.log.clientHeight >= this.log.scrollHeight - 4;
      let all = this.log.textContent + text;
      if (all.length > LOG_KEEP) all = all.slice(all.length - LOG_KEEP);
      this.log.textContent = all;
      if (stick) this.log.scrollTop = this.log.scrollHeight;
    }, abort.signal).then(() => {
      if (!abort.signal.aborted) this.logNote.textContent = this.log.textContent ? 'end of log (the job has finished)' : 'no output';
    }, (e) => {
      if (abort.signal.aborted) return;
      this.logNote.textContent = e.status === 403 || e.status === 401
        ? `${e.message}${this.ctx.user ? '' : ' — add a token at the top to read it.'}`
        : `Cannot follow the log: ${e.message}`;
    });
  }

  async act(path, body, what) {
    try {
      const job = await api(`/jobs/${this.id}/${path}`, { method: 'POST', body });
      this.ctx.toast(`${what}: job ${job.id} is ${job.state}${job.stop ? ' (stopping)' : ''}`);
    } catch (e) {
      this.ctx.toast(`${what} refused: ${e.message}`, true);
    }
  }

  async resubmit() {
    if (!window.confirm(`Run job ${this.id}'s file again as a new job?`)) return;
    try {
      const job = await api(`/jobs/${this.id}/resubmit`, { method: 'POST', body: {} });
      this.ctx.toast(`Run again: job ${job.id} is ${job.state}`);
      window.location.hash = `#/job/${job.id}`;
    } catch (e) {
      this.ctx.toast(`Run again refused: ${e.message}`, true);
    }
  }

  cancel() {
    if (!window.confirm(`Cancel job ${this.id}? A running job is asked to checkpoint and stop.`)) return;
    this.act('cancel', {}, 'Cancel');
  }

  setPriority() {
    const v = Number(this.prioInput.value);
    // The daemon's range (spec::job::MAX_PRIORITY); it checks again.
    if (!Number.isInteger(v) || Math.abs(v) > 1000) {
      this.ctx.toast('The priority is a whole number from -1000 to 1000', true);
      return;
    }
    this.act('priority', { priority: v }, 'Priority');
  }

  /** Re-renders the ETA; local only, no request. */
  tick() {
    if (this.job?.state === 'running') this.renderProgress();
  }
}
