// The official Appwrite web SDK (npm `appwrite`) signed in with an Appwrite session against a
// live herald that resolves sessions with `--appwrite-endpoint`: `client.setSession()` makes
// the SDK send `authentication` with the session after `connected`; herald asks "Appwrite"
// for the account and the team memberships, and the subscription must then receive that
// user's team events and nobody else's.
//
// No Appwrite server runs here: the stand-in below answers GET /v1/account, GET /v1/teams and
// GET /v1/teams/{teamId}/memberships as Appwrite's REST API documents them (Account, Team list
// and Membership list objects; 401 for an unknown session; project and session from the
// X-Appwrite-Project and X-Appwrite-Session headers).
// Usage: node tests/sdk/session.mjs path/to/herald
import { createServer } from 'node:http';
import { sleep, startHerald } from './herald.mjs';

const { Client, Realtime } = await import('appwrite');

const session = Buffer.from(JSON.stringify({ id: 'ann', secret: 'ann-secret' })).toString('base64');
const calls = [];

function answer(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

const appwrite = createServer((req, res) => {
  const url = new URL(req.url, 'http://stand-in');
  calls.push(url.pathname);
  if (req.headers['x-appwrite-project'] !== 'proj1') {
    return answer(res, 404, { message: 'Project with the requested ID could not be found.', code: 404, type: 'project_not_found' });
  }
  if (req.headers['x-appwrite-session'] !== session) {
    return answer(res, 401, { message: 'User (role: guests) missing scopes (["account"])', code: 401, type: 'general_unauthorized_scope' });
  }
  if (url.pathname === '/v1/account') {
    return answer(res, 200, {
      $id: 'ann', name: 'Ann', email: 'ann@example.com', emailVerification: true, phoneVerification: false,
      labels: [], status: true, prefs: {}, registration: '2026-11-01T10:00:00.000+00:00',
    });
  }
  if (url.pathname === '/v1/teams') {
    return answer(res, 200, { total: 1, teams: [{ $id: 't1', name: 'Team one', total: 2, prefs: {} }] });
  }
  if (url.pathname === '/v1/teams/t1/memberships') {
    const query = JSON.parse(url.searchParams.get('queries[]') ?? '{}');
    const member = { $id: 'm1', userId: 'ann', teamId: 't1', roles: ['editor'], confirm: true, mfa: false };
    const list = query.method === 'equal' && query.values?.[0] !== 'ann' ? [] : [member];
    return answer(res, 200, { total: list.length, memberships: list });
  }
  return answer(res, 404, { message: 'Route not found.', code: 404, type: 'general_route_not_found' });
});
await new Promise((resolve) => appwrite.listen(0, '127.0.0.1', resolve));
const endpoint = `http://127.0.0.1:${appwrite.address().port}/v1`;

const { ws, stop, fail, publish } = await startHerald(process.argv[2], ['--appwrite-endpoint', endpoint]);
const done = (code) => {
  appwrite.close();
  stop(code);
};

const client = new Client().setEndpoint(`http://${ws}/v1`).setProject('proj1').setSession(session);
const realtime = new Realtime(client);
const got = [];
await realtime.subscribe(['documents'], (ev) => got.push(ev.payload));

// The SDK debounces its connect; give it time to open, authenticate and subscribe.
await sleep(1500);
const event = (roles, payload) =>
  publish({ project: 'proj1', channels: ['documents'], events: ['databases.db.collections.c.documents.update'], roles, payload });
await event(['team:t1'], { $id: 'team' });
await event(['team:t1/editor'], { $id: 'editors' });
await event(['team:t2'], { $id: 'other-team' });
await event(['user:bob'], { $id: 'bobs' });
await event(['users/verified'], { $id: 'verified' });
await event(['guests'], { $id: 'guests-only' });
await sleep(1000);

const ids = got.map((p) => p?.$id);
if (JSON.stringify(ids) !== JSON.stringify(['team', 'editors', 'verified'])) {
  fail(`Realtime.subscribe with setSession got ${JSON.stringify(ids)} (Appwrite stand-in saw ${JSON.stringify(calls)})`);
}
if (!calls.includes('/v1/account') || !calls.includes('/v1/teams/t1/memberships')) {
  fail(`herald did not ask the Appwrite stand-in as expected: ${JSON.stringify(calls)}`);
}
console.log(`ok: appwrite SDK with setSession, resolved by --appwrite-endpoint, received ${ids.join(', ')} only`);
await realtime.disconnect?.();
done(0);
