// The official Appwrite web SDK (npm `appwrite`) against a live herald:
// the modern Realtime class (Gen C: subscribe messages) and the legacy client.subscribe
// (Gen A: channels in the URL) must both receive a published event.
// Usage: node tests/sdk/subscribe.mjs path/to/herald
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import WebSocket from 'ws';

// Node 20 has no global WebSocket and the SDK calls window.setInterval for its heartbeat.
globalThis.WebSocket = WebSocket;
globalThis.window = globalThis;
globalThis.localStorage = { getItem: () => null, setItem: () => {}, removeItem: () => {} };

const { Client, Realtime } = await import('appwrite');

const bin = process.argv[2];
if (!bin) {
  console.error('usage: node subscribe.mjs path/to/herald');
  process.exit(2);
}

const herald = spawn(bin, ['serve', '--listen', '127.0.0.1:0', '--admin', '127.0.0.1:0', '--shards', '2'], {
  stdio: ['ignore', 'pipe', 'inherit'],
  env: { ...process.env, HERALD_LOG: 'warn' },
});
const stop = (code) => {
  herald.kill('SIGKILL');
  process.exit(code);
};
const fail = (msg) => {
  console.error(`FAIL: ${msg}`);
  stop(1);
};
setTimeout(() => fail('timed out after 30 s'), 30_000).unref();

const line = await new Promise((resolve) => {
  createInterface({ input: herald.stdout }).once('line', resolve);
});
const ws = /ws:\/\/([^/\s]+)/.exec(line)?.[1];
const admin = /admin on http:\/\/(\S+)/.exec(line)?.[1];
if (!ws || !admin) fail(`unexpected startup line: ${line}`);

async function publish(body) {
  const r = await fetch(`http://${admin}/v1/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const json = await r.json();
  if (r.status !== 200) fail(`publish refused: ${r.status} ${JSON.stringify(json)}`);
  return json.id;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const client = new Client().setEndpoint(`http://${ws}/v1`).setProject('proj1');

// Modern API (SDK >= 25): subscribe messages over a connection opened with no channels.
const realtime = new Realtime(client);
const modern = new Promise((resolve) => {
  realtime.subscribe(['files'], (ev) => resolve(ev));
});
// Legacy API: channels travel in the URL.
const legacy = new Promise((resolve) => {
  client.subscribe(['documents'], (ev) => resolve(ev));
});

// The SDKs debounce their connects; give them time to open and subscribe.
await sleep(1500);
const fileId = await publish({
  project: 'proj1',
  channels: ['files'],
  events: ['buckets.b.files.f1.create'],
  payload: { $id: 'f1', name: 'cat.png' },
});
const docId = await publish({
  project: 'proj1',
  channels: ['documents'],
  events: ['databases.db.collections.c.documents.d1.create'],
  payload: { $id: 'd1', title: 'hello' },
});

const [m, l] = await Promise.all([modern, legacy]);
if (m.payload?.$id !== 'f1' || !m.events?.includes('buckets.b.files.f1.create')) {
  fail(`Realtime.subscribe got ${JSON.stringify(m)}`);
}
if (l.payload?.$id !== 'd1' || !l.channels?.includes('documents')) {
  fail(`client.subscribe got ${JSON.stringify(l)}`);
}
console.log(`ok: appwrite SDK received ${fileId} via Realtime.subscribe and ${docId} via client.subscribe`);
await realtime.disconnect?.();
stop(0);
