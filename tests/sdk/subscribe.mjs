// The official Appwrite web SDK (npm `appwrite`) against a live herald:
// the modern Realtime class (Gen C: subscribe messages) and the legacy client.subscribe
// (Gen A: channels in the URL) must both receive a published event.
// Usage: node tests/sdk/subscribe.mjs path/to/herald
import { sleep, startHerald } from './herald.mjs';

const { Client, Realtime } = await import('appwrite');

const { ws, stop, fail, publish } = await startHerald(process.argv[2]);

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
