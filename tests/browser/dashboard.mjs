// Drives the jobd dashboard in Debian's headless Chromium (playwright-core, no browser
// download) against a real daemon, and checks what a person would: the queue shows the
// submitted jobs with their waiting reason, the GPU bar shows the reservation, progress
// advances by push (no reload, no request), the loss chart has points, an action without a
// token is refused, and with a token priority and cancel work from the page.
//
// Run by tests/it/dashboard.rs, which starts jobd and submits the jobs. Environment:
//   JOBD_URL        http://127.0.0.1:PORT of the daemon
//   JOBD_TOKEN      a token of the owner of the jobs below
//   TRAIN_JOB       a running train job on a fake GPU that runs until cancelled
//   DEP_JOB         a job waiting for TRAIN_JOB (depends_on)
//   PUBLISH_JOB     a short train job that publishes into Ollama (may still be running)
//   PUBLISH_NAME    the model name it publishes
//   SCHEDULE        a schedule of the same owner that does not fire during the test
//   SWEEP           a sweep of two short train jobs (learning_rate 1e-3 and 1e-2), held
//   ARTIFACTS       directory for the screenshots
//   CHROMIUM        the browser (default /usr/bin/chromium)
// Prints one JSON line with what it saw; exits 1 with the reason on the first failed check.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = process.env;
const url = env.JOBD_URL;
const train = Number(env.TRAIN_JOB);
const dep = Number(env.DEP_JOB);
const artifacts = env.ARTIFACTS;
mkdirSync(artifacts, { recursive: true });

const seen = {};
const t0 = Date.now();
let current = 'start';
function check(cond, what) {
  if (!cond) throw new Error(`${current}: ${what}`);
}
async function step(name, fn) {
  current = name;
  const start = Date.now();
  await fn();
  seen[`${name}_ms`] = Date.now() - start;
}
async function apiGet(path, token) {
  const res = await fetch(`${url}/api/v1${path}`, { headers: token ? { Authorization: `Bearer ${token}` } : {} });
  return res.json();
}

const browser = await chromium.launch({
  executablePath: env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  // Playwright adds a fresh --user-data-dir; the rest keep Chromium off the (closed) network.
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const problems = [];
function watch(page) {
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // Chromium logs every 4xx answer; the refused action (401) and the log of another
    // user's job (403) are expected here.
    if (m.type() === 'error' && !/status of 40[13]/.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  page.on('dialog', (d) => d.accept());
}
const cspScript = () => {
  document.addEventListener('securitypolicyviolation', (e) => {
    console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`);
  });
};

let page;
let shown; // the page a failure screenshot shows
try {
  const desktop = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  await desktop.addInitScript(cspScript);
  page = await desktop.newPage();
  shown = page;
  watch(page);
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));

  await step('queue', async () => {
    await page.goto(url);
    const row = page.locator(`#queue tbody tr[data-id="${train}"]`);
    await row.waitFor({ timeout: 20000 });
    await page.waitForFunction((id) => document.querySelector(`#queue tr[data-id="${id}"]`)?.dataset.state === 'running', train, { timeout: 30000 });
    check((await row.locator('.state').textContent()).includes('running'), 'the train job shows as running');
    const why = await page.locator(`#queue tbody tr[data-id="${dep}"] td.why`).textContent();
    check(why.includes(`dependency ${train}`), `the dependent job says why it waits: ${why}`);
    seen.dep_waiting = why;
    check((await row.locator('td[data-label="VRAM"]').textContent()).includes('10 GiB'), 'VRAM column');
    const counts = await page.locator('#counts').textContent();
    // Queued: the dependent job and the sweep's two held jobs.
    check(/\d+ running/.test(counts) && /3 queued/.test(counts), `header counts: ${counts}`);
    await page.waitForSelector('#live[data-state="live"]');
  });

  await step('gpu_bar', async () => {
    const gpus = await apiGet('/gpus');
    const gpu = gpus.gpus.find((g) => g.jobs.some((j) => j.id === train));
    check(gpu, 'the API places the train job on a GPU');
    const seg = page.locator(`.gpu[data-index="${gpu.index}"] .seg.job[data-job="${train}"]`);
    await seg.waitFor({ timeout: 10000 });
    check(Number(await seg.getAttribute('data-bytes')) === 10 * 2 ** 30, 'the segment is the 10 GiB reservation');
    const ratio = await seg.evaluate((s) => s.getBoundingClientRect().width / s.parentElement.getBoundingClientRect().width);
    const want = (10 * 2 ** 30) / gpu.total_bytes;
    check(Math.abs(ratio - want) < 0.01, `segment width ${ratio.toFixed(3)} of the bar, want ${want.toFixed(3)}`);
    seen.gpu_segment_ratio = Number(ratio.toFixed(4));
    const legend = await page.locator(`.gpu[data-index="${gpu.index}"] .legend`).textContent();
    check(legend.includes('10 GiB reserved by jobd'), `legend: ${legend}`);
  });

  await step('progress_by_push', async () => {
    await page.evaluate(() => { window.notReloaded = true; });
    const text = page.locator(`#queue tbody tr[data-id="${train}"] .ptext`);
    await text.waitFor({ timeout: 20000 });
    const stepOf = async () => Number((await text.textContent()).split('/')[0]);
    // The publishing job finishing changes the queue (and rightly makes the page fetch it
    // again): let it finish and leave the page, then expect no request at all.
    if (env.PUBLISH_JOB) {
      await page.waitForSelector(`#queue tbody tr[data-id="${env.PUBLISH_JOB}"]`, { state: 'detached', timeout: 90000 });
      // (The page's stream stays open, so "network idle" never comes: wait for 1 s without
      // a new request instead.)
      for (let n = -1; n !== requests.length;) {
        n = requests.length;
        await page.waitForTimeout(1000);
      }
    }
    const first = await stepOf();
    const before = requests.length;
    await page.waitForFunction(([id, s]) => {
      const t = document.querySelector(`#queue tr[data-id="${id}"] .ptext`)?.textContent || '';
      return Number(t.split('/')[0]) >= s + 20;
    }, [train, first], { timeout: 40000 });
    const later = await stepOf();
    check(await page.evaluate(() => window.notReloaded === true), 'the page was not reloaded');
    const made = requests.slice(before);
    check(made.length === 0, `progress came by push, yet the page made requests: ${made.join(', ')}`);
    seen.progress = [first, later];
    check((await page.locator(`#queue tbody tr[data-id="${train}"] td.eta`).textContent()).trim() !== '', 'an ETA is shown');
    await page.screenshot({ path: join(artifacts, 'queue-desktop.png'), fullPage: true });
  });

  await step('job_page_chart', async () => {
    await page.locator(`#queue tbody tr[data-id="${train}"] td.name a`).click();
    await page.waitForSelector('#chart-loss[data-points]', { timeout: 20000 });
    const points = async () => (await page.getAttribute('#chart-loss', 'data-points')).split(',').map(Number);
    await page.waitForFunction(() => Number(document.querySelector('#chart-loss')?.dataset.points?.split(',')[0]) >= 3, null, { timeout: 20000 });
    const [loss0] = await points();
    // New metrics arrive by push while the page is open.
    await page.waitForFunction((n) => Number(document.querySelector('#chart-loss').dataset.points.split(',')[0]) > n, loss0, { timeout: 30000 });
    const [loss1, evalPoints] = await points();
    seen.loss_points = [loss0, loss1];
    seen.eval_points = evalPoints;
    // The curve is drawn: the canvas holds pixels in the train-loss colour (#2f6feb).
    const painted = await page.evaluate(() => {
      const c = document.querySelector('#chart-loss canvas');
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 0; i < d.length; i += 4) {
        if (Math.abs(d[i] - 47) < 30 && Math.abs(d[i + 1] - 111) < 30 && Math.abs(d[i + 2] - 235) < 30 && d[i + 3] > 200) n += 1;
      }
      return n;
    });
    check(painted > 100, `the loss curve is drawn (${painted} pixels of its colour)`);
    seen.loss_curve_pixels = painted;
    // The legend shows the latest train loss as a number (QA saw "0" for 1.6e-4, and "--").
    const legend = await page.locator('#chart-loss .u-legend .u-series:nth-child(2) .u-value').textContent();
    check(Number.isFinite(Number(legend)) && Number(legend) > 0, `the legend's train loss: ${legend}`);
    seen.loss_legend = legend;
    // Axis labels fit their column: thousands of tokens/s as "52.3k" (QA saw ".00e+4").
    const ticks = await page.evaluate(async () => {
      const { axisNum } = await import('/js/util.js');
      return [52345, 1234567, 0.25].map(axisNum).join(' ');
    });
    check(ticks === '52.3k 1.23M 0.25', `axis labels: ${ticks}`);
    await page.waitForSelector('.checkpoints tbody tr', { timeout: 30000 });
    await page.waitForFunction(() => [...document.querySelectorAll('.events td')].some((td) => td.textContent === 'running'));
    // Logs belong to the owner: read-only visitors are told so.
    await page.waitForFunction(() => /owner/.test(document.querySelector('#log + p')?.textContent || ''), null, { timeout: 10000 });
    seen.log_note_anonymous = await page.locator('#log + p').textContent();
  });

  await step('refused_without_token', async () => {
    const answer = page.waitForResponse((r) => r.url().endsWith(`/jobs/${train}/cancel`));
    await page.click('#act-cancel');
    const res = await answer;
    check(res.status() === 401, `cancel without a token answered ${res.status()}`);
    await page.waitForSelector('#toast.error:not([hidden])');
    const toast = await page.locator('#toast').textContent();
    check(/refused/.test(toast) && /token/.test(toast), `the page says why: ${toast}`);
    seen.refusal = toast;
    const job = await apiGet(`/jobs/${train}`);
    check(job.state === 'running' && !job.stop, `the job still runs (${job.state})`);
    await page.screenshot({ path: join(artifacts, 'job-refused.png'), fullPage: true });
  });

  await step('token', async () => {
    await page.click('#token-button');
    await page.fill('#token-input', 'not-a-token');
    await page.click('#token-save');
    await page.waitForSelector('#token-error:not([hidden])');
    await page.fill('#token-input', env.JOBD_TOKEN);
    await page.click('#token-save');
    await page.waitForFunction(() => document.querySelector('#token-button').textContent.includes('nobody'));
    // The owner reads the log, live.
    await page.waitForFunction(() => /step \d+\//.test(document.querySelector('#log').textContent), null, { timeout: 20000 });
    const lines = async () => (await page.locator('#log').textContent()).split('\n').length;
    const n = await lines();
    await page.waitForFunction((k) => document.querySelector('#log').textContent.split('\n').length > k, n, { timeout: 20000 });
  });

  await step('priority', async () => {
    await page.fill('#act-priority-value', '7');
    await page.click('#act-priority');
    await page.waitForFunction(() => document.querySelector('.meta').textContent.includes('priority 7'), null, { timeout: 10000 });
    check((await apiGet(`/jobs/${train}`)).priority === 7, 'the daemon has priority 7');
  });

  await step('cancel', async () => {
    await page.click('#act-cancel');
    await page.waitForFunction(() => document.querySelector('.title-row .state')?.textContent === 'cancelled', null, { timeout: 30000 });
    const job = await apiGet(`/jobs/${train}`);
    check(job.state === 'cancelled', `the daemon says ${job.state}`);
    check(job.reason.startsWith('cancelled by nobody'), `reason: ${job.reason}`);
    check(await page.isDisabled('#act-cancel'), 'cancel is disabled on a cancelled job');
    await page.screenshot({ path: join(artifacts, 'job-cancelled.png'), fullPage: true });
  });

  await step('requeue', async () => {
    await page.click('#act-requeue');
    await page.waitForFunction(() => ['queued', 'starting', 'running'].includes(document.querySelector('.title-row .state')?.textContent), null, { timeout: 20000 });
    await page.waitForFunction(() => document.querySelector('.title-row .state')?.textContent === 'running', null, { timeout: 30000 });
    // Stop it again so the daemon is idle for the rest.
    await page.click('#act-cancel');
    await page.waitForFunction(() => document.querySelector('.title-row .state')?.textContent === 'cancelled', null, { timeout: 30000 });
  });

  await step('resubmit', async () => {
    // "Run again": the same job file as a new job of the caller; the page moves to it.
    await page.click('#act-resubmit');
    await page.waitForFunction((old) => /^#\/job\/\d+$/.test(window.location.hash) && window.location.hash !== `#/job/${old}`, train, { timeout: 10000 });
    const copy = Number(page.url().split('#/job/')[1]);
    const job = await apiGet(`/jobs/${copy}`, env.JOBD_TOKEN);
    check(job.id > train && job.owner.user === 'nobody', `the copy: job ${job.id} of ${job.owner.user}`);
    check(job.source === (await apiGet(`/jobs/${train}`, env.JOBD_TOKEN)).source, 'the same job file');
    await page.waitForFunction(() => ['queued', 'starting', 'running'].includes(document.querySelector('.title-row .state')?.textContent), null, { timeout: 20000 });
    await page.click('#act-cancel');
    await page.waitForFunction(() => document.querySelector('.title-row .state')?.textContent === 'cancelled', null, { timeout: 30000 });
  });

  await step('schedules', async () => {
    await page.goto(`${url}/#/`);
    const row = page.locator(`#schedules tbody tr[data-id="${env.SCHEDULE}"]`);
    await row.waitFor({ timeout: 10000 });
    check((await row.textContent()).includes('0 0 1 1 *'), 'the schedule shows its cron expression');
    await row.locator('.sched-toggle').click();
    await page.waitForSelector(`#schedules tbody tr[data-id="${env.SCHEDULE}"][data-paused="true"]`, { timeout: 10000 });
    const listed = await apiGet('/schedules', env.JOBD_TOKEN);
    check(listed.schedules.find((x) => x.id === Number(env.SCHEDULE))?.paused === true, 'the daemon has it paused');
  });

  if (env.PUBLISH_JOB) {
    await step('published', async () => {
      await page.goto(`${url}/#/job/${env.PUBLISH_JOB}`);
      await page.waitForSelector('#ollama-run', { timeout: 90000 });
      const run = await page.locator('#ollama-run').textContent();
      check(run === `ollama run ${env.PUBLISH_NAME}`, `the run line: ${run}`);
      seen.ollama_run = run;
      await page.waitForFunction(() => Number(document.querySelector('#chart-loss')?.dataset.points?.split(',')[0]) >= 2);
      await page.screenshot({ path: join(artifacts, 'job-published.png'), fullPage: true });
    });
  }

  await step('stale_token', async () => {
    // A token jobd no longer knows (revoked): the page forgets it and stays usable read-only.
    await page.evaluate(() => localStorage.setItem('jobd.token', 'revoked-token-0123456789'));
    await page.goto(`${url}/#/?state=all`);
    await page.waitForSelector('#toast.error:not([hidden])', { timeout: 10000 });
    const toast = await page.locator('#toast').textContent();
    check(/no longer valid/.test(toast), `the page says the token is stale: ${toast}`);
    await page.waitForSelector(`#queue tbody tr[data-id="${train}"]`, { timeout: 10000 });
    await page.waitForSelector('.gpu', { timeout: 10000 });
    check((await page.locator('#token-button').textContent()).includes('Read-only'), 'read-only again');
    check(await page.evaluate(() => localStorage.getItem('jobd.token')) === null, 'the stale token is forgotten');
  });

  // A sweep of two short train jobs: the page lists both with their values, marks the one
  // with the lowest evaluation loss (as the API's results say), draws each job's curve, and
  // links to the jobs and back.
  await step('sweep', async () => {
    const sweep = Number(env.SWEEP);
    // The queue links a sweep's jobs to their sweep.
    await page.goto(`${url}/#/`);
    const tag = page.locator(`#queue tbody tr[data-id="${sweep + 1}"] a.sweep-tag`);
    await tag.waitFor({ timeout: 10000 });
    check((await tag.getAttribute('href')) === `#/sweep/${sweep}`, 'the queue row links the sweep');
    // Held until now, so that they do not change the queue while the steps above watch it.
    for (const id of [sweep, sweep + 1]) {
      const res = await fetch(`${url}/api/v1/jobs/${id}/release`, {
        method: 'POST', headers: { Authorization: `Bearer ${env.JOBD_TOKEN}` },
      });
      check(res.ok, `release job ${id}: ${res.status}`);
    }
    await page.goto(`${url}/#/sweep/${sweep + 1}`);
    await page.waitForSelector('#sweep-table tbody tr');
    check(await page.locator('#sweep-table tbody tr').count() === 2, 'both jobs of the sweep');
    // Until both have ended and the page has fetched their final metrics.
    await page.waitForFunction(() => /★ best: job/.test(document.querySelector('#sweep-best')?.textContent || ''), null, { timeout: 60000 });
    const view = await apiGet(`/sweeps/${sweep}`);
    check(view.jobs.every((j) => j.state === 'succeeded' && j.result), 'the API has both results');
    const best = view.jobs.reduce((a, b) => (b.result.best_eval_loss < a.result.best_eval_loss ? b : a));
    const marked = await page.locator('#sweep-table tr.best').getAttribute('data-id');
    check(Number(marked) === best.id, `the best row is job ${best.id}, not ${marked}`);
    const text = await page.textContent('#sweep-table');
    check(text.includes('1e-3') && text.includes('1e-2'), `the swept values: ${text}`);
    await page.waitForFunction(() => {
      const p = document.querySelector('#sweep-chart-eval')?.dataset.points;
      return p && p.split(',').length === 2 && p.split(',').every((n) => Number(n) >= 2);
    }, null, { timeout: 10000 });
    seen.sweep_points = await page.getAttribute('#sweep-chart-loss', 'data-points');
    // Without the cursor on it, each legend shows the latest values, not "--".
    await page.waitForFunction(() => {
      const legend = document.querySelector('#sweep-chart-eval .u-legend')?.textContent || '';
      return /^\s*step\s*\d/.test(legend) && !legend.includes('--');
    }, null, { timeout: 5000 });
    seen.sweep_legend = (await page.textContent('#sweep-chart-eval .u-legend')).replace(/\s+/g, ' ').trim();
    await page.screenshot({ path: join(artifacts, 'sweep.png'), fullPage: true });
    await page.click(`#sweep-table tr[data-id="${best.id}"] td.name`);
    await page.waitForSelector('#sweep-link');
    check((await page.textContent('#sweep-link')) === `sweep ${sweep}`, 'the job page links its sweep');
    await page.click('#sweep-link');
    await page.waitForSelector('#sweep-table tbody tr');
  });

  await step('phone', async () => {
    const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
    await phone.addInitScript(cspScript);
    const p = await phone.newPage();
    shown = p;
    watch(p);

    await p.goto(`${url}/#/?state=all`);
    await p.waitForSelector(`#queue tbody tr[data-id="${train}"]`);
    await p.waitForSelector('.gpu');
    const overflow = await p.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 0, `the queue fits the phone's width (${overflow}px too wide)`);
    await p.screenshot({ path: join(artifacts, 'queue-phone.png'), fullPage: true });
    await p.goto(`${url}/#/job/${env.PUBLISH_JOB || train}`);
    await p.waitForSelector('#chart-loss[data-points]');
    const overflowJob = await p.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflowJob <= 0, `the job page fits the phone's width (${overflowJob}px too wide)`);
    await p.screenshot({ path: join(artifacts, 'job-phone.png'), fullPage: true });
    await p.goto(`${url}/#/sweep/${env.SWEEP}`);
    await p.waitForSelector('#sweep-chart-loss[data-points]');
    const overflowSweep = await p.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflowSweep <= 0, `the sweep page fits the phone's width (${overflowSweep}px too wide)`);
    await p.screenshot({ path: join(artifacts, 'sweep-phone.png'), fullPage: true });
  });

  current = 'console';
  check(problems.length === 0, `errors in the page:\n${problems.join('\n')}`);
  seen.total_ms = Date.now() - t0;
  console.log(JSON.stringify(seen));
} catch (e) {
  if (shown) await shown.screenshot({ path: join(artifacts, 'failure.png'), fullPage: true }).catch(() => {});
  console.error(`dashboard test failed: ${e.message}`);
  if (problems.length) console.error(problems.join('\n'));
  console.log(JSON.stringify(seen));
  process.exitCode = 1;
} finally {
  await browser.close();
}
