// The admin dashboard (GET /) in a real browser: headless Chromium driven by playwright-core.
//
//   node tests/dashboard/dashboard.mjs path/to/herald [reports-dir]
//
// Starts herald with an admin token on ephemeral loopback ports and checks what an operator
// sees: the page asks for the token, then shows live figures; its connection count rises when
// WebSocket clients (opened by the browser itself, in a second page) connect and falls when they
// leave; its publish form delivers an event to every subscriber. Screenshots go to reports-dir
// (default reports/) so a person can look at the page. Fails (exit 1) on the first check that
// does not hold; the whole run is bounded at 90 s.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

const [bin, reportsArg] = process.argv.slice(2);
if (!bin) {
  console.error('usage: node tests/dashboard/dashboard.mjs path/to/herald [reports-dir]');
  process.exit(2);
}
const reports = resolve(reportsArg ?? 'reports');
mkdirSync(reports, { recursive: true });
const CLIENTS = 25;
const TOKEN = 'dashboard-test-token-0123456789';
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

const herald = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--admin', '127.0.0.1:0', '--shards', '2',
  '--admin-token', TOKEN], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, HERALD_LOG: 'warn' } });
let browser;
async function stop(code) {
  if (browser) await browser.close().catch(() => {});
  herald.removeAllListeners('exit');
  herald.kill('SIGKILL');
  process.exit(code);
}
function fail(message) {
  console.error(`FAIL: ${message}`);
  return stop(1);
}
setTimeout(() => fail('timed out after 90 s'), 90_000).unref();

herald.once('exit', (code, signal) => fail(`herald exited (${code ?? signal}) before the test ended`));
const line = await new Promise((done) => createInterface({ input: herald.stdout }).once('line', done));
const ws = /ws:\/\/([^/\s]+)/.exec(line)?.[1];
const admin = /admin on http:\/\/(\S+)/.exec(line)?.[1];
if (!ws || !admin) await fail(`unexpected startup line: ${line}`);

// Waits until the text of `selector` satisfies `test`; fails with what it showed last.
async function expectText(page, selector, test, what, timeout = 10_000) {
  const end = Date.now() + timeout;
  let text = '';
  while (Date.now() < end) {
    text = (await page.textContent(selector)) ?? '';
    if (test(text)) return text;
    await page.waitForTimeout(100);
  }
  return fail(`${what}: ${selector} shows "${text}"`);
}

try {
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const dashboard = await context.newPage();
  const errors = [];
  dashboard.on('pageerror', (e) => errors.push(e.message));
  dashboard.on('console', (m) => { if (m.type() === 'error' && !/status of (401|400)/.test(m.text())) errors.push(m.text()); });

  await dashboard.goto(`http://${admin}/`);
  // Without the token the page shows no figures and asks for it.
  await dashboard.waitForSelector('#token-form:not([hidden])', { timeout: 10_000 });
  await expectText(dashboard, '#status', (t) => t === 'admin token needed', 'status without the token');
  await expectText(dashboard, '#connections', (t) => t === '–', 'figures shown without the token');
  await dashboard.fill('#token', TOKEN);
  await dashboard.click('#token-form button');
  await expectText(dashboard, '#status', (t) => t === 'ready', 'status once the token is given');
  await expectText(dashboard, '#connections', (t) => t === '0', 'connections before any client');
  await expectText(dashboard, '#bus', (t) => t.startsWith('embedded'), 'the bus tile');

  // Real browser WebSockets, from a page of their own (the dashboard's policy lets it talk to
  // its own origin only). That page is on the admin origin: from about:blank browsers send
  // `Origin: null`, which herald refuses.
  const clients = await context.newPage();
  await clients.goto(`http://${admin}/healthz`);
  await clients.evaluate(async ({ url, n }) => {
    window.received = [];
    window.sockets = await Promise.all(Array.from({ length: n }, (_, i) => new Promise((ok, bad) => {
      const s = new WebSocket(url);
      window.received[i] = [];
      s.onmessage = (m) => {
        const msg = JSON.parse(m.data);
        if (msg.type === 'connected') ok(s);
        if (msg.type === 'event') window.received[i].push(msg.data.payload);
      };
      s.onerror = () => bad(new Error(`client ${i} could not connect`));
    })));
  }, { url: `ws://${ws}/v1/realtime?project=console&channels[]=files`, n: CLIENTS });
  await expectText(dashboard, '#connections', (t) => t === String(CLIENTS), `connections with ${CLIENTS} clients`);
  await expectText(dashboard, '#per-shard', (t) => /0: \d+ · 1: \d+/.test(t), 'per-shard figures');

  // The publish form: project "console", channel "files" by default.
  const project = await dashboard.inputValue('#pub-project');
  if (project !== 'console') await fail(`the form's project is "${project}", not the default project`);
  await dashboard.fill('#pub-payload', '{"$id": "from-the-dashboard", "n": 1}');
  await dashboard.click('#pub-submit');
  await expectText(dashboard, '#pub-result', (t) => /^published, id \S+/.test(t), 'publish result');
  const delivered = await clients.waitForFunction(
    () => window.received.every((r) => r.length === 1 && r[0].$id === 'from-the-dashboard'),
    null, { timeout: 10_000 },
  ).then(() => true, () => false);
  if (!delivered) {
    const got = await clients.evaluate(() => window.received.map((r) => r.length));
    await fail(`not every subscriber got the dashboard's event exactly once: ${JSON.stringify(got)}`);
  }
  await expectText(dashboard, '#messages-out', (t) => t === `${CLIENTS} messages`, 'messages out after the publish');
  await expectText(dashboard, '#events-in', (t) => t === '1 events', 'events in after the publish');
  await expectText(dashboard, '#latency', (t) => /≤ [\d.]+ m?s \/ ≤ [\d.]+ m?s/.test(t), 'fan-out latency after the publish');
  await dashboard.waitForTimeout(1500); // one more poll, so the charts show the step
  await dashboard.screenshot({ path: join(reports, 'dashboard.png'), fullPage: true });

  // A refused publish shows herald's reason.
  await dashboard.fill('#pub-channels', '');
  await dashboard.click('#pub-submit');
  await expectText(dashboard, '#pub-result', (t) => t.startsWith('refused (400)'), 'publish without a channel');

  await clients.evaluate(() => window.sockets.forEach((s) => s.close(1000)));
  await expectText(dashboard, '#connections', (t) => t === '0', 'connections after the clients left');
  await dashboard.screenshot({ path: join(reports, 'dashboard-after.png'), fullPage: true });
  if (errors.length) await fail(`the page reported errors: ${errors.join('; ')}`);
  console.log(`dashboard: token asked for, ${CLIENTS} connections counted up and down, publish form delivered to all; screenshots in ${reports}`);
  await stop(0);
} catch (e) {
  await fail(e.stack ?? String(e));
}
