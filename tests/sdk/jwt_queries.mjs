// The official Appwrite web SDK (npm `appwrite`) as a signed-in user against a live herald:
// `client.setJWT()` (the SDK puts it in the URL) and `Realtime.subscribe(channels, cb, [Query])`
// must receive only that user's events whose payload matches the query.
// Usage: node tests/sdk/jwt_queries.mjs path/to/herald
import { createHmac } from 'node:crypto';
import { sleep, startHerald } from './herald.mjs';

const { Client, Realtime, Query } = await import('appwrite');

const secret = 'sdk-test-openssl-key';
const { ws, stop, fail, publish } = await startHerald(process.argv[2], ['--jwt-secret', secret]);

// An HS256 token shaped like Appwrite's account.createJWT() (userId, sessionId, exp).
const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
function jwt(userId) {
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ userId, sessionId: 's1', exp: Math.floor(Date.now() / 1000) + 900 })}`;
  return `${head}.${createHmac('sha256', secret).update(head).digest('base64url')}`;
}

const client = new Client().setEndpoint(`http://${ws}/v1`).setProject('proj1').setJWT(jwt('ann'));
const realtime = new Realtime(client);
const got = [];
await realtime.subscribe(['documents'], (ev) => got.push(ev.payload), [Query.equal('status', ['open'])]);

// The SDK debounces its connect; give it time to open and subscribe.
await sleep(1500);
const event = (roles, payload) =>
  publish({ project: 'proj1', channels: ['documents'], events: ['databases.db.collections.c.documents.create'], roles, payload });
await event(['user:bob'], { $id: 'bobs', status: 'open' });
await event(['user:ann'], { $id: 'closed', status: 'closed' });
await event(['user:ann'], { $id: 'mine', status: 'open' });
await event(['guests'], { $id: 'guests-only', status: 'open' });
await event(['any'], { $id: 'public', status: 'open' });
await sleep(1000);

const ids = got.map((p) => p?.$id);
if (JSON.stringify(ids) !== JSON.stringify(['mine', 'public'])) {
  fail(`Realtime.subscribe as ann with Query.equal got ${JSON.stringify(ids)}`);
}
console.log(`ok: appwrite SDK with setJWT and Query.equal received ${ids.join(', ')} only`);
await realtime.disconnect?.();
stop(0);
