// The GPU view: per GPU, one bar of its total memory split into what each jobd job reserved,
// what other processes use, and what is free; the jobs on it; utilisation where known.

import { bytes, el, jobColour } from './util.js';

function pct(part, total) {
  return total > 0 ? (100 * part) / total : 0;
}

function segment(cls, part, total, label, title, extra = {}) {
  const s = el('div', { class: `seg ${cls}`, title, ...extra }, el('span', {}, label));
  s.style.width = `${pct(part, total).toFixed(3)}%`;
  return s;
}

function gpuCard(g) {
  const total = g.total_bytes;
  const foreign = g.foreign_bytes;
  const free = Math.max(0, total - g.reserved_bytes - foreign);
  const bar = el('div', { class: 'bar', role: 'img', 'aria-label': `GPU ${g.index} memory` });
  for (const j of g.jobs) {
    const seg = segment(
      'job',
      j.reserved_bytes,
      total,
      `#${j.id} ${bytes(j.reserved_bytes)}`,
      `job ${j.id} ${j.name} (${j.owner}): ${bytes(j.reserved_bytes)} reserved`,
      { dataset: { job: j.id, bytes: j.reserved_bytes } },
    );
    seg.style.background = jobColour(j.id);
    bar.append(seg);
  }
  if (foreign > 0) {
    bar.append(segment('foreign', foreign, total, `other ${bytes(foreign)}`,
      `${bytes(foreign)} used by processes jobd does not own`, { dataset: { bytes: foreign } }));
  }
  bar.append(segment('free', free, total, '', `${bytes(free)} free`, { dataset: { bytes: free } }));

  const util = g.utilization_percent !== undefined && g.utilization_percent !== null
    ? el('span', { class: 'util', title: 'GPU utilisation' }, `${g.utilization_percent}% busy`)
    : null;
  const jobs = g.jobs.length
    ? el('ul', { class: 'gpu-jobs' }, g.jobs.map((j) => {
      const swatch = el('span', { class: 'swatch' });
      swatch.style.background = jobColour(j.id);
      return el('li', {}, swatch, el('a', { href: `#/job/${j.id}` }, `#${j.id} ${j.name}`),
        ` · ${j.owner} · ${bytes(j.reserved_bytes)}`);
    }))
    : el('p', { class: 'muted' }, 'no jobd jobs');
  return el('article', { class: `gpu${g.excluded ? ' excluded' : ''}`, dataset: { index: g.index } },
    el('header', {},
      el('strong', {}, `GPU ${g.index}`), ' ', el('span', { class: 'muted' }, g.name),
      util, g.excluded ? el('span', { class: 'muted' }, ' (not used by jobd)') : null),
    bar,
    el('p', { class: 'legend' },
      `${bytes(g.reserved_bytes)} reserved by jobd · ${bytes(foreign)} other · ${bytes(free)} free of ${bytes(total)}`),
    jobs);
}

/** Renders a `GET /gpus` answer (or the stream's `gpus` event) into `root`. */
export function renderGpus(root, resp) {
  if (!resp.gpus.length) {
    const why = resp.note ? `: ${resp.note}` : '';
    root.replaceChildren(el('p', { class: 'muted' }, `No GPUs (${resp.source})${why}. Jobs run on the CPU.`));
    return;
  }
  root.replaceChildren(...resp.gpus.map(gpuCard));
}
