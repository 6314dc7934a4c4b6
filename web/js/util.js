// DOM building and formatting. Text always goes in as text nodes, never as HTML: job names,
// reasons and logs are written by users.

/** `el('td', {class: 'x', dataset: {id: 1}}, 'text', child)` */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

export function bytes(n) {
  if (n === undefined || n === null) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  const digits = i === 0 || v >= 100 || Number.isInteger(v) ? 0 : 1;
  return `${v.toFixed(digits)} ${units[i]}`;
}

/** "45s", "12m 5s", "3h 20m", "2d 4h" */
export function duration(ms) {
  if (!Number.isFinite(ms)) return '';
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${m % 60}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

export function time(ms) {
  return ms ? new Date(ms).toLocaleString() : '';
}

export function num(v, digits = 4) {
  if (v === undefined || v === null) return '';
  if (Math.abs(v) >= 1000 || (v !== 0 && Math.abs(v) < 1e-3)) return v.toExponential(2);
  return Number(v.toFixed(digits)).toString();
}

/** A chart axis label that fits its narrow column: 52.3k, 1.2M, 0.25, 3.00e-5. */
export function axisNum(v) {
  if (v === undefined || v === null) return '';
  const a = Math.abs(v);
  for (const [scale, unit] of [[1e12, 'T'], [1e9, 'G'], [1e6, 'M'], [1e3, 'k']]) {
    if (a >= scale) return `${Number((v / scale).toPrecision(3))}${unit}`;
  }
  return num(v, 3);
}

/**
 * Wraps an async `task` so that calls while it runs do not overlap: they coalesce into one
 * more run after it (a burst of "the queue changed" pushes makes two fetches, not twenty).
 */
export function coalesced(task) {
  let running = false;
  let again = false;
  const run = async () => {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await task();
    } finally {
      running = false;
    }
    if (again) {
      again = false;
      run();
    }
  };
  return run;
}

/** A stable colour per job, so it is the same on every GPU bar. */
export function jobColour(id) {
  const hue = (id * 137.508) % 360;
  return `hsl(${hue.toFixed(0)} 60% 52%)`;
}

export function stateBadge(state, stopping) {
  return el('span', { class: `state state-${state}` }, stopping ? `${state} (stopping)` : state);
}

/**
 * Estimated time left for a running train job. The rate comes from the progress this page has
 * seen over the last minute; before there is enough of it, from the whole run when this is the
 * job's first attempt (a resumed run does not say at which step it started).
 */
export class Eta {
  constructor() {
    this.samples = new Map(); // job id -> [{t, step}]
  }

  observe(id, progress, now = Date.now()) {
    if (!progress) return;
    const s = this.samples.get(id) || [];
    const last = s[s.length - 1];
    if (last && progress.step < last.step) s.length = 0; // a restart from a checkpoint
    if (!last || progress.step !== last.step) s.push({ t: now, step: progress.step });
    while (s.length > 2 && now - s[0].t > 60000) s.shift();
    this.samples.set(id, s);
  }

  /** Milliseconds left, or undefined when unknown. */
  left(job, now = Date.now()) {
    const p = job.progress;
    if (!p || !p.total_steps || job.state !== 'running') return undefined;
    const rest = p.total_steps - p.step;
    if (rest <= 0) return 0;
    const s = this.samples.get(job.id) || [];
    let rate; // steps per ms
    if (s.length >= 2 && s[s.length - 1].t - s[0].t >= 3000) {
      const a = s[0];
      const b = s[s.length - 1];
      rate = (b.step - a.step) / (b.t - a.t);
    } else if (job.attempts <= 1 && job.started_at && p.step > 0) {
      rate = p.step / Math.max(1, now - job.started_at);
    }
    return rate > 0 ? rest / rate : undefined;
  }
}
