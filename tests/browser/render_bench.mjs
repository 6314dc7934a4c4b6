// Time to first render of the dashboard's queue view, for benches/dashboard.rs: the
// `jobd:queue-rendered` performance mark (set in the frame after the first page of rows is
// rendered), measured from the start of navigation. One cold load per fresh browser context (nothing
// cached) and warm reloads (files revalidated by ETag). JOBD_URL: the daemon; RUNS (default 10).

import { chromium } from 'playwright-core';

const url = process.env.JOBD_URL;
const runs = Number(process.env.RUNS || 10);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

async function measure(page, load) {
  await load();
  await page.waitForFunction(() => performance.getEntriesByName('jobd:queue-rendered').length > 0, null, { timeout: 30000 });
  return page.evaluate(() => {
    const nav = performance.getEntriesByType('navigation')[0];
    return {
      render: performance.getEntriesByName('jobd:queue-rendered')[0].startTime,
      dcl: nav.domContentLoadedEventEnd,
      rows: document.querySelectorAll('#queue tbody tr').length,
      info: document.querySelector('#page-info').textContent,
    };
  });
}

const cold = [];
const warm = [];
let info = '';
for (let i = 0; i < runs; i += 1) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await ctx.newPage();
  const c = await measure(page, () => page.goto(url));
  cold.push(c.render);
  info = `${c.rows} rows shown, ${c.info}`;
  const w = await measure(page, () => page.reload());
  warm.push(w.render);
  await ctx.close();
}
await browser.close();

const stats = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return `median ${s[Math.floor(s.length / 2)].toFixed(0)} ms, max ${s[s.length - 1].toFixed(0)} ms`;
};
console.log(`time to first render of the queue view (${runs} runs; ${info}):`);
console.log(`  cold (new browser context): ${stats(cold)}`);
console.log(`  warm (reload):              ${stats(warm)}`);
