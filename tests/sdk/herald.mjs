// What the SDK scripts share: a herald started on ephemeral loopback ports, a bounded run, the
// publish API, and the globals the web SDK needs under Node.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import WebSocket from 'ws';

// Node 20 has no global WebSocket and the SDK calls window.setInterval for its heartbeat.
globalThis.WebSocket = WebSocket;
globalThis.window = globalThis;
globalThis.localStorage = { getItem: () => null, setItem: () => {}, removeItem: () => {} };

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Starts herald (`bin`, with `extra` arguments); the run fails after 30 s whatever happens.
export async function startHerald(bin, extra = []) {
  if (!bin) {
    console.error('usage: node <script>.mjs path/to/herald');
    process.exit(2);
  }
  const args = ['serve', '--listen', '127.0.0.1:0', '--admin', '127.0.0.1:0', '--shards', '2', ...extra];
  const herald = spawn(bin, args, {
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
  return { ws, admin, stop, fail, publish };
}
