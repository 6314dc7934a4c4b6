// The sweep view (`#/sweep/ID`): a sweep's jobs side by side (`/sweeps/{id}`: values, state,
// losses, the best marked) and their loss curves overlaid (each train job's `/jobs/{id}/metrics`).
// Kept current by the shared stream: "the queue changed" and progress of its jobs refetch it,
// at most every two seconds; a job's metrics are fetched again only when its step moved.

import { api } from './api.js';
import { Chart, loadUplot } from './job.js';
import { el, num, stateBadge } from './util.js';

const COLOURS = ['#2f6feb', '#d9480f', '#2b8a3e', '#862e9c', '#c2255c', '#0b7285', '#e67700', '#5c940d', '#364fc7', '#a61e4d'];
/** The n-th job's colour: the ten above, then hues spread by the golden angle. */
function colourAt(n) {
  return n < COLOURS.length ? COLOURS[n] : `hsl(${Math.round((n * 137.508) % 360)} 65% 45%)`;
}
const REFRESH_MS = 2000;

/** The best job: lowest best evaluation loss, else lowest training loss (as `jobctl sweep`). */
export function bestOf(jobs) {
  const pick = (score) => {
    let best = null;
    for (const j of jobs) {
      const s = j.result ? score(j.result) : undefined;
      if (s === undefined || s === null || !Number.isFinite(s)) continue;
      if (!best || s < best.s) best = { id: j.id, s };
    }
    return best?.id ?? null;
  };
  return pick((r) => r.best_eval_loss) ?? pick((r) => r.loss);
}

/** A colour swatch (set through the CSSOM: the page's CSP allows no inline style attribute). */
function swatch(colour) {
  const s = el('span', { class: 'swatch' });
  s.style.background = colour;
  return s;
}

export class SweepPage {
  constructor(ctx, root) {
    this.ctx = ctx;
    this.root = root;
  }

  show(id) {
    this.hide();
    this.gen = (this.gen || 0) + 1;
    this.id = id;
    this.missing = false;
    this.view = null;
    this.metrics = new Map(); // job id -> {step, records}
    this.colours = new Map(); // job id -> colour, kept while the page is open
    this.charts = null;
    this.charted = ''; // the train jobs the charts were made for
    this.build();
    this.refresh();
  }

  hide() {
    clearTimeout(this.timer);
    this.timer = null;
    this.dropCharts();
    this.id = null;
  }

  dropCharts() {
    if (this.charts) for (const c of this.charts) c.destroy();
    this.charts = null;
    this.charted = '';
  }

  /** A job's colour: given on first sight, the same in the table and the charts. */
  colourOf(id) {
    if (!this.colours.has(id)) this.colours.set(id, colourAt(this.colours.size));
    return this.colours.get(id);
  }

  build() {
    this.title = el('h1', {}, `Sweep ${this.id}`);
    this.meta = el('p', { class: 'meta' });
    this.table = el('table', { class: 'queue sweep', id: 'sweep-table' });
    this.best = el('p', { id: 'sweep-best' });
    this.chartBox = el('div', { class: 'charts' });
    // Many swept keys make a wide table: it scrolls inside its panel, not the page.
    this.jobsPanel = el('section', { class: 'panel' }, el('h2', {}, 'Jobs'), el('div', { class: 'table-scroll' }, this.table), this.best);
    this.lossPanel = el('section', { class: 'panel' }, el('h2', {}, 'Loss'), this.chartBox);
    this.jobsPanel.hidden = true;
    this.lossPanel.hidden = true;
    this.root.replaceChildren(
      el('div', { class: 'job-head' },
        el('a', { href: '#/', class: 'back' }, '← queue'),
        el('div', { class: 'title-row' }, this.title),
        this.meta),
      this.jobsPanel,
      this.lossPanel);
  }

  /** A change somewhere in the queue, or progress of `jobId`: refetch soon (coalesced). */
  poke(jobId) {
    // A sweep that is not there (a 404) is not asked about again.
    if (this.id === null || this.timer || this.missing) return;
    if (jobId !== undefined && !this.view?.jobs.some((j) => j.id === jobId)) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.refresh();
    }, REFRESH_MS);
  }

  async refresh() {
    const gen = this.gen;
    let view;
    try {
      view = await api(`/sweeps/${this.id}`);
    } catch (e) {
      if (this.gen !== gen) return;
      this.title.textContent = `Sweep ${this.id}`;
      this.meta.textContent = e.message;
      this.missing = e.status === 404;
      return;
    }
    if (this.gen !== gen) return;
    this.view = view;
    this.jobsPanel.hidden = false;
    this.title.textContent = `Sweep ${view.id}`;
    this.render();
    await this.fetchMetrics(gen);
  }

  render() {
    const { jobs, keys } = this.view;
    const owner = jobs[0]?.owner;
    const ended = jobs.filter((j) => ['succeeded', 'failed', 'cancelled'].includes(j.state)).length;
    this.meta.textContent = `${jobs.length} jobs of ${owner} over ${keys.join(' × ')} · ${ended} ended`;
    const best = bestOf(jobs);
    const anyTrain = jobs.some((j) => j.kind === 'train');
    const anyEval = jobs.some((j) => j.result?.best_eval_loss !== undefined);
    const head = ['ID', 'Name', 'State', ...keys, ...(anyTrain ? ['Step', 'Loss'] : []), ...(anyEval ? ['Eval loss', 'Best eval'] : [])];
    // Command jobs log no losses: no loss columns, no chart panel.
    this.lossPanel.hidden = !anyTrain;
    const rows = jobs.map((j) => {
      const values = new Map((j.sweep?.values ?? []).map((v) => [v.key, v.value]));
      const r = j.result;
      const steps = r ? (j.progress?.total_steps ? `${r.step}/${j.progress.total_steps}` : r.step) : '';
      const tr = el('tr', { class: j.id === best ? 'best' : null, dataset: { id: j.id } },
        el('td', {}, swatch(this.colourOf(j.id)), el('a', { href: `#/job/${j.id}` }, j.id), j.id === best ? ' ★' : ''),
        el('td', { class: 'name' }, j.name),
        el('td', {}, stateBadge(j.state), j.state === 'queued' && j.held_by ? ' (held)' : ''),
        ...keys.map((k) => el('td', { class: 'value' }, values.get(k) ?? '')),
        ...(anyTrain ? [
          el('td', { class: 'num' }, steps),
          el('td', { class: 'num' }, r ? num(r.loss) : ''),
        ] : []),
        ...(anyEval ? [
          el('td', { class: 'num' }, r?.eval_loss !== undefined ? num(r.eval_loss) : ''),
          el('td', { class: 'num' }, r?.best_eval_loss !== undefined ? `${num(r.best_eval_loss)} @${r.best_eval_step}` : ''),
        ] : []));
      tr.addEventListener('click', (e) => {
        if (e.target.tagName !== 'A') window.location.hash = `#/job/${j.id}`;
      });
      return tr;
    });
    this.table.replaceChildren(
      el('thead', {}, el('tr', {}, head.map((h) => el('th', {}, h)))),
      el('tbody', {}, rows));
    const b = jobs.find((j) => j.id === best);
    if (b) {
      const how = b.result.best_eval_loss !== undefined
        ? `eval loss ${num(b.result.best_eval_loss)} at step ${b.result.best_eval_step}`
        : `loss ${num(b.result.loss)} at step ${b.result.step}`;
      const values = (b.sweep?.values ?? []).map((v) => `${v.key}=${v.value}`).join(', ');
      this.best.textContent = `★ best${ended === jobs.length ? '' : ' so far'}: job ${b.id} (${values}), ${how}`;
    } else {
      this.best.textContent = jobs.some((j) => j.kind === 'train') ? 'No losses logged yet.' : 'Command jobs: no losses to compare.';
    }
  }

  /** Fetches the metrics of train jobs whose step moved, then redraws the charts. */
  async fetchMetrics(gen) {
    const stale = this.view.jobs.filter((j) => j.result && this.metrics.get(j.id)?.step !== j.result.step);
    await Promise.all(stale.map(async (j) => {
      try {
        const records = await api(`/jobs/${j.id}/metrics`);
        this.metrics.set(j.id, { step: j.result.step, records });
      } catch {
        // Left as it was: the next refresh tries again.
      }
    }));
    if (this.gen !== gen || !this.metrics.size) return;
    // A job that joined the sweep (a resubmit) or left it (cleaned): new series.
    const train = this.view.jobs.filter((j) => j.kind === 'train').map((j) => j.id).join(',');
    if (this.charts && this.charted !== train) this.dropCharts();
    for (const id of [...this.metrics.keys()]) {
      if (!this.view.jobs.some((j) => j.id === id)) this.metrics.delete(id);
    }
    if (!this.charts) {
      try {
        await loadUplot();
      } catch (e) {
        this.chartBox.replaceChildren(el('p', { class: 'error' }, e.message));
        return;
      }
      if (this.gen !== gen) return;
      this.makeCharts();
      this.charted = train;
    }
    // One row per step any job logged; each job's values under its own keys.
    const bySteps = new Map();
    for (const [id, { records }] of this.metrics) {
      for (const r of records) {
        const row = bySteps.get(r.step) ?? { step: r.step };
        row[`loss@${id}`] = r.loss;
        if (r.eval_loss !== undefined) row[`eval@${id}`] = r.eval_loss;
        bySteps.set(r.step, row);
      }
    }
    const rows = [...bySteps.values()].sort((a, b) => a.step - b.step);
    for (const c of this.charts) c.set(rows);
  }

  makeCharts() {
    const jobs = this.view.jobs.filter((j) => j.kind === 'train');
    // The same colour as the job's swatch in the table.
    const series = (key, points) => jobs.map((j) => ({
      label: `job ${j.id}`, key: `${key}@${j.id}`, colour: this.colourOf(j.id), points,
    }));
    const boxes = [el('div', { class: 'chart', id: 'sweep-chart-loss' }), el('div', { class: 'chart', id: 'sweep-chart-eval' })];
    this.chartBox.replaceChildren(...boxes);
    // Close curves must stay apart: the axis spans the data, not whole powers of ten.
    this.charts = [
      new Chart(boxes[0], 'Training loss', series('loss', false), { log: true, tight: true }),
      new Chart(boxes[1], 'Evaluation loss', series('eval', true), { log: true, tight: true }),
    ];
  }
}
