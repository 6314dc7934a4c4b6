// Recurring jobs on the queue page: each schedule with its cron expression, next and last
// run (linked to the job it queued), and, for a signed-in user, pause/resume and run now.
// Refreshed when the queue changes (a firing queues a job) and after each action.

import { api } from './api.js';
import { coalesced, el, stateBadge, time } from './util.js';

export class SchedulesView {
  constructor(ctx) {
    this.ctx = ctx;
    this.panel = document.querySelector('#schedules-panel');
    this.body = document.querySelector('#schedules tbody');
    /** Fetches the schedules again (calls during a fetch coalesce into one more). */
    this.refresh = coalesced(() => this.load());
  }

  async load() {
    try {
      const { schedules } = await api('/schedules');
      this.render(schedules);
    } catch (e) {
      // Reads may be closed to anonymous visitors: then there is nothing to show.
      if (e.status !== 401 && e.status !== 403) this.ctx.toast(`Cannot load the schedules: ${e.message}`, true);
      this.panel.hidden = true;
    }
  }

  render(schedules) {
    this.panel.hidden = schedules.length === 0;
    this.body.replaceChildren(...schedules.map((s) => this.row(s)));
  }

  row(s) {
    const cronText = s.spec.schedule || '';
    // last_fire is the last firing's time, which queued last_job unless it was skipped
    // (last_skip says why): then it is the skip's time, shown as such, with its reason.
    const job = s.last_job
      ? [el('a', { href: `#/job/${s.last_job}` }, `job ${s.last_job}`), ' ',
        s.last_state ? stateBadge(s.last_state) : '']
      : [];
    let last;
    if (s.last_skip) {
      last = el('span', {}, ...job, job.length ? el('br') : '',
        el('span', { class: 'muted sched-skip' }, `skipped ${time(s.last_fire)}: ${s.last_skip}`));
    } else if (s.last_job) {
      last = el('span', {}, ...job, ' ', el('span', { class: 'muted' }, time(s.last_fire)));
    } else {
      last = el('span', { class: 'muted' }, s.last_fire ? `skipped ${time(s.last_fire)}` : 'not yet');
    }
    const next = s.paused ? el('span', { class: 'state state-interrupted' }, 'paused') : time(s.next_fire);
    const actions = el('td', { class: 'actions' });
    if (this.ctx.user) {
      actions.append(
        el('button', {
          type: 'button',
          class: 'sched-toggle',
          onclick: () => this.act(s, s.paused ? 'resume' : 'pause'),
        }, s.paused ? 'Resume' : 'Pause'),
        el('button', {
          type: 'button',
          class: 'sched-run-now',
          onclick: () => this.act(s, 'run-now'),
        }, 'Run now'),
      );
    }
    return el('tr', { dataset: { id: s.id, paused: String(s.paused) } },
      el('td', { 'data-label': 'ID' }, s.id),
      el('td', { class: 'name', 'data-label': 'Name', title: s.name }, s.name),
      el('td', { 'data-label': 'Owner' }, s.owner.user),
      el('td', { 'data-label': 'Schedule' }, el('code', {}, cronText)),
      el('td', { class: 'next', 'data-label': 'Next run' }, next),
      el('td', { 'data-label': 'Last run' }, last),
      el('td', {
        class: 'num',
        'data-label': 'Runs',
        // Why the last firing queued nothing (a run still active, the owner at max_submitted).
        title: s.last_skip ? `${s.skipped} firing(s) skipped; the last: ${s.last_skip}` : `${s.skipped} firing(s) skipped`,
      },
        s.skipped ? `${s.runs} (+${s.skipped} skipped)` : s.runs),
      actions);
  }

  async act(s, action) {
    try {
      await api(`/schedules/${s.id}/${action}`, { method: 'POST' });
      const done = { pause: 'paused', resume: 'resumed', 'run-now': 'queued a run of' }[action];
      this.ctx.toast(`${done[0].toUpperCase()}${done.slice(1)} schedule ${s.id} (${s.name})`);
    } catch (e) {
      this.ctx.toast(`Schedule ${s.id}: ${e.message}`, true);
    }
    this.refresh();
  }
}
