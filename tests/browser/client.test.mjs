// Unit tests of the browser client (proxy/web/pushfleet.js) with Node's built-in runner:
//   node --test tests/browser/client.test.mjs
// No npm dependencies: a fake WebSocket plays the worker, and a fake `random` makes jitter
// predictable. Delays are a few milliseconds and every wait has a deadline.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fileURLToPath } from 'node:url';

const clientUrl = new URL('../../proxy/web/pushfleet.js', import.meta.url);
const { PushfleetClient, fullJitterDelay, closeAction } = await import(fileURLToPath(clientUrl));

const EPOCH = '9f86d081884c7d65';
const OTHER_EPOCH = '4e07408562bedb8b';

/** A WebSocket class of its own per test; `sockets` lists every instance it made. */
function fakeWebSocketClass() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.extensions = '';
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }

    send(text) {
      if (this.readyState !== 1) throw new Error('send on a socket that is not open');
      this.sent.push(JSON.parse(text));
    }

    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }

    // --- the worker's side ---
    accept({ worker = 'worker-a', connection = sockets.length, extensions = '' } = {}) {
      this.readyState = 1;
      this.extensions = extensions;
      this.onopen?.({ type: 'open' });
      this.push({ type: 'welcome', protocol: 'pushfleet.v1', worker, connection });
    }

    push(obj) {
      this.onmessage?.({ data: JSON.stringify(obj) });
    }

    drop(code, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }

    requests(op) {
      return this.sent.filter((r) => r.op === op);
    }

    /** Acks the subscribe for `topic` that has no reply yet. */
    ack(topic, history) {
      const req = this.requests('subscribe').find((r) => r.topic === topic && !r.acked);
      assert.ok(req, `no unanswered subscribe for ${topic}`);
      req.acked = true;
      this.push({ type: 'ack', id: req.id, op: 'subscribe', topic, ...(history ? { history } : {}) });
      return req;
    }

    message(topic, offset, payload = { n: offset }, epoch = EPOCH) {
      const position = offset === null ? undefined : { epoch, offset };
      this.push({ type: 'message', topic, ...(position ? { position } : {}), ts: 1763900000000000, payload });
    }
  }
  return { FakeWebSocket, sockets };
}

async function waitFor(cond, what, timeoutMs = 1000) {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A client on a fake socket class with small delays, and every event it emits. */
function setup(options = {}) {
  const { FakeWebSocket, sockets } = fakeWebSocketClass();
  const client = new PushfleetClient('ws://fleet.test/ws', {
    WebSocket: FakeWebSocket,
    baseDelayMs: 5,
    maxDelayMs: 20,
    drainDelayMs: 20,
    stableAfterMs: 1000,
    pingIntervalMs: 0,
    connectTimeoutMs: 0,
    random: () => 0.5,
    ...options,
  });
  const events = {};
  for (const type of ['state', 'welcome', 'subscribed', 'message', 'gap', 'reset', 'error', 'closed']) {
    events[type] = [];
    client.addEventListener(type, (e) => events[type].push(e.detail));
  }
  const socket = async (n) => {
    await waitFor(() => sockets.length >= n, `socket #${n}`);
    return sockets[n - 1];
  };
  return { client, sockets, events, socket };
}

test('fullJitterDelay stays in [0, min(cap, base * 2^attempt))', () => {
  assert.equal(fullJitterDelay(0, 500, 30000, () => 0), 0);
  assert.equal(fullJitterDelay(0, 500, 30000, () => 0.5), 250);
  assert.equal(fullJitterDelay(3, 500, 30000, () => 0.5), 2000);
  assert.equal(fullJitterDelay(10, 500, 30000, () => 0.5), 15000); // capped
  assert.equal(fullJitterDelay(5000, 500, 30000, () => 0.5), 15000); // 2 ** 5000 is Infinity
  for (let attempt = 0; attempt < 40; attempt++) {
    const window = Math.min(30000, 500 * 2 ** attempt);
    for (let i = 0; i < 50; i++) {
      const d = fullJitterDelay(attempt, 500, 30000);
      assert.ok(d >= 0 && d < window, `attempt ${attempt}: ${d} not in [0, ${window})`);
    }
  }
});

test('closeAction: stop what a retry cannot fix, soon after a drain, back off otherwise', () => {
  for (const code of [1002, 1003, 1007, 1008, 1009, 4400, 4401, 4403, 4499]) {
    assert.equal(closeAction(code), 'stop', `code ${code}`);
  }
  assert.equal(closeAction(1012), 'soon');
  assert.equal(closeAction(4402), 'renew');
  for (const code of [1000, 1001, 1005, 1006, 1011, 1013, 4000, 4001, 4002, 4003, 4399, 4500]) {
    assert.equal(closeAction(code), 'backoff', `code ${code}`);
  }
});

test('bad options are refused with a TypeError naming them', () => {
  const { FakeWebSocket } = fakeWebSocketClass();
  const make = (options) => () => new PushfleetClient('ws://fleet.test/ws', { WebSocket: FakeWebSocket, ...options });
  assert.throws(make({ baseDelayMs: -1 }), { name: 'TypeError', message: /baseDelayMs/ });
  assert.throws(make({ maxDelayMs: 10, baseDelayMs: 100 }), { name: 'TypeError', message: /maxDelayMs/ });
  assert.throws(make({ pingIntervalMs: Number.NaN }), { name: 'TypeError', message: /pingIntervalMs/ });
  assert.throws(make({ pongTimeoutMs: 2 ** 40 }), { name: 'TypeError', message: /pongTimeoutMs/ });
  assert.throws(make({ protocols: [42] }), { name: 'TypeError', message: /protocols/ });
  assert.throws(make({ random: 0.5 }), { name: 'TypeError', message: /random/ });
  assert.throws(make({ token: 42 }), { name: 'TypeError', message: /token/ });
  assert.throws(make({ token: '' }), { name: 'TypeError', message: /token/ });
  assert.throws(make({ pingInterval: 1000 }), { name: 'TypeError', message: /pingInterval/ });
  if (!globalThis.WebSocket) {
    // Node 20 has no global WebSocket: the default cannot work, and the error says what to do.
    assert.throws(() => new PushfleetClient('ws://fleet.test/ws'), { name: 'TypeError', message: /WebSocket/ });
  }
  assert.throws(() => new PushfleetClient('ftp://fleet.test/ws', { WebSocket: FakeWebSocket }), {
    name: 'TypeError',
    message: /url/,
  });
  const client = new PushfleetClient('https://fleet.test/ws', { WebSocket: FakeWebSocket });
  assert.throws(() => client.subscribe(''), TypeError);
  assert.throws(() => client.subscribe('match.1', { last: -1 }), { name: 'TypeError', message: /last/ });
});

test('connects, subscribes on welcome, reports worker, extensions and state', async () => {
  const { client, events, socket } = setup();
  client.subscribe('match.1', { last: 50 });
  client.connect();
  client.connect(); // idempotent
  const ws = await socket(1);
  assert.equal(ws.url, 'ws://fleet.test/ws');
  assert.deepEqual(ws.protocols, ['pushfleet.v1']);
  assert.equal(client.state, 'connecting');
  ws.accept({ worker: 'worker-a', extensions: 'permessage-deflate; server_no_context_takeover' });
  assert.equal(client.state, 'open');
  assert.equal(client.worker, 'worker-a');
  assert.match(client.extensions, /permessage-deflate/);
  assert.deepEqual(events.welcome, [
    { worker: 'worker-a', connection: 1, extensions: 'permessage-deflate; server_no_context_takeover' },
  ]);
  assert.deepEqual(
    events.state.map((s) => s.state),
    ['connecting', 'open'],
  );
  const [sub] = ws.requests('subscribe');
  assert.deepEqual(sub, { op: 'subscribe', id: sub.id, topic: 'match.1', last: 50 });
  assert.equal(typeof sub.id, 'number');

  // Subscribing while open goes out at once, with a larger id.
  client.subscribe('match.2');
  const second = ws.requests('subscribe')[1];
  assert.equal(second.topic, 'match.2');
  assert.ok(second.id > sub.id);
  assert.equal('last' in second, false);
  client.close();
});

test('after a message, a reconnect resumes with since plus last, on fresh increasing ids', async () => {
  const { client, events, socket } = setup();
  client.subscribe('match.1', { last: 50 });
  client.subscribe('match.2', { last: 10 });
  client.connect();
  const ws1 = await socket(1);
  ws1.accept();
  ws1.ack('match.1', { replayed: 0 });
  ws1.ack('match.2', { replayed: 0 });
  ws1.message('match.1', 7);
  assert.deepEqual(client.position('match.1'), { epoch: EPOCH, offset: 7 });
  assert.equal(client.position('match.2'), null);

  ws1.drop(1006);
  assert.equal(client.state, 'reconnecting');
  assert.equal(client.worker, null);
  const ws2 = await socket(2);
  ws2.accept({ worker: 'worker-b' });
  const subs = ws2.requests('subscribe');
  assert.deepEqual(
    subs.map(({ id, ...rest }) => rest),
    [
      { op: 'subscribe', topic: 'match.1', since: { epoch: EPOCH, offset: 7 }, last: 50 },
      { op: 'subscribe', topic: 'match.2', last: 10 },
    ],
  );
  const firstIds = ws1.requests('subscribe').map((r) => r.id);
  assert.ok(subs.every((r) => r.id > Math.max(...firstIds)), 'ids keep increasing across sockets');

  // Replies are matched by id, not by order.
  ws2.ack('match.2', { replayed: 0 });
  ws2.ack('match.1', { recovered: true, replayed: 0, position: { epoch: EPOCH, offset: 7 } });
  const resumed = events.subscribed.slice(-2);
  assert.deepEqual(
    resumed.map((s) => [s.topic, s.resumed]),
    [
      ['match.2', false],
      ['match.1', true],
    ],
  );
  assert.equal(client.stats.connects, 2);
  assert.equal(client.stats.reconnects, 1);
  assert.equal(client.worker, 'worker-b');
  client.close();
});

test('the next history.replayed messages are marked replay, live ones after are not', async () => {
  const { client, events, socket } = setup();
  client.subscribe('match.1', { last: 3 });
  client.connect();
  const ws = await socket(1);
  ws.accept();
  ws.message('match.1', 0); // before the ack: not ours yet, dropped
  ws.ack('match.1', { replayed: 2, position: { epoch: EPOCH, offset: 4 } });
  ws.message('match.1', 3);
  ws.message('match.1', 4);
  ws.message('match.1', 5);
  assert.deepEqual(
    events.message.map((m) => [m.position.offset, m.replay]),
    [
      [3, true],
      [4, true],
      [5, false],
    ],
  );
  assert.deepEqual(events.message[0].payload, { n: 3 });
  assert.equal(events.message[0].ts, 1763900000000000);
  assert.equal(client.stats.messages, 3);
  assert.equal(client.stats.replayed, 2);
  client.close();
});

test('duplicates are dropped, unannounced holes counted, gaps and new epochs accepted', async () => {
  const { client, events, socket } = setup();
  client.subscribe('match.1');
  client.connect();
  const ws = await socket(1);
  ws.accept();
  ws.ack('match.1');
  ws.message('match.1', 0);
  ws.message('match.1', 1);
  ws.message('match.1', 1); // duplicate
  ws.message('match.1', 0); // older: duplicate too
  ws.message('match.1', 4); // 2 and 3 missing without notice
  ws.push({ type: 'gap', topic: 'match.1', epoch: EPOCH, from: 5, to: 7 });
  ws.message('match.1', 8); // expected after the gap
  ws.message('match.1', null, { live: true }); // live-only
  ws.message('match.1', 0, { n: 0 }, OTHER_EPOCH); // new stream
  ws.message('match.1', 1, { n: 1 }, OTHER_EPOCH);

  assert.deepEqual(
    events.message.map((m) => (m.position ? `${m.position.epoch.slice(0, 4)}:${m.position.offset}` : 'live')),
    ['9f86:0', '9f86:1', '9f86:4', '9f86:8', 'live', '4e07:0', '4e07:1'],
  );
  assert.deepEqual(events.gap, [{ topic: 'match.1', epoch: EPOCH, from: 5, to: 7 }]);
  const { duplicates, unexpectedGaps, messages } = client.stats;
  assert.deepEqual({ duplicates, unexpectedGaps, messages }, { duplicates: 2, unexpectedGaps: 1, messages: 7 });
  assert.deepEqual(client.position('match.1'), { epoch: OTHER_EPOCH, offset: 1 });
  client.close();
});

test('a gap right after the last message moves the resume position past it', async () => {
  const { client, socket } = setup();
  client.subscribe('match.1', { last: 5 });
  client.connect();
  const ws1 = await socket(1);
  ws1.accept();
  ws1.ack('match.1');
  ws1.message('match.1', 15);
  ws1.push({ type: 'gap', topic: 'match.1', epoch: EPOCH, from: 16, to: 18 });
  assert.deepEqual(client.position('match.1'), { epoch: EPOCH, offset: 18 });
  ws1.drop(1001);
  const ws2 = await socket(2);
  ws2.accept();
  assert.deepEqual(ws2.requests('subscribe')[0].since, { epoch: EPOCH, offset: 18 });
  client.close();
});

test('recovered:false forgets the position; what follows is accepted as a fresh start', async () => {
  const { client, events, socket } = setup();
  client.subscribe('match.1', { last: 2 });
  client.connect();
  const ws1 = await socket(1);
  ws1.accept();
  ws1.ack('match.1');
  ws1.message('match.1', 10);
  ws1.drop(1012);

  const ws2 = await socket(2);
  ws2.accept();
  ws2.ack('match.1', { recovered: false, reason: 'too_old', replayed: 2, position: { epoch: EPOCH, offset: 10 } });
  const sub = events.subscribed.at(-1);
  assert.equal(sub.resumed, true);
  assert.equal(sub.history.recovered, false);
  assert.equal(sub.history.reason, 'too_old');
  assert.equal(client.position('match.1'), null);
  // The fallback replays offsets we delivered before: they are delivered again, not dropped.
  ws2.message('match.1', 9);
  ws2.message('match.1', 10);
  assert.deepEqual(
    events.message.slice(1).map((m) => [m.position.offset, m.replay]),
    [
      [9, true],
      [10, true],
    ],
  );
  assert.equal(client.stats.duplicates, 0);

  // A reset notice voids the position too: the next resume asks for the last messages only.
  ws2.push({ type: 'reset', topic: 'match.1', epoch: OTHER_EPOCH });
  assert.deepEqual(events.reset, [{ topic: 'match.1', epoch: OTHER_EPOCH }]);
  assert.equal(client.position('match.1'), null);
  ws2.drop(1001);
  const ws3 = await socket(3);
  ws3.accept();
  const { id, ...req } = ws3.requests('subscribe')[0];
  assert.deepEqual(req, { op: 'subscribe', topic: 'match.1', last: 2 });
  client.close();
});

test('stop codes fail for good and never reconnect', async () => {
  for (const code of [1008, 4401]) {
    const { client, events, sockets, socket } = setup({ maxDelayMs: 10 });
    client.connect();
    const ws = await socket(1);
    ws.accept();
    ws.drop(code, 'nope');
    assert.equal(client.state, 'failed');
    assert.deepEqual(events.closed.at(-1), { code, reason: 'nope', action: 'stop' });
    assert.equal(events.state.at(-1).code, code);
    await sleep(40); // four times the largest backoff window
    assert.equal(sockets.length, 1, `close code ${code} must not reconnect`);
    client.close();
  }
});

test('a token function is asked before every socket; 4402 renews it, 4401 stops', async () => {
  const issued = [];
  const token = async () => {
    await sleep(1);
    issued.push(`tok.en.${issued.length + 1}`);
    return issued.at(-1);
  };
  const { client, events, sockets, socket } = setup({ token });
  client.subscribe('match.1');
  client.connect();
  const ws1 = await socket(1);
  assert.deepEqual(ws1.protocols, ['pushfleet.v1', 'pushfleet.bearer.tok.en.1']);
  ws1.accept();
  ws1.drop(4402, 'access token expired');
  assert.equal(events.closed.at(-1).action, 'renew');
  const ws2 = await socket(2);
  assert.deepEqual(ws2.protocols, ['pushfleet.v1', 'pushfleet.bearer.tok.en.2']);
  ws2.accept();
  assert.equal(ws2.requests('subscribe').length, 1, 'subscriptions come back with the new token');
  ws2.drop(4401, 'the access token is malformed');
  assert.equal(client.state, 'failed');
  await sleep(40);
  assert.equal(sockets.length, 2);
  assert.equal(issued.length, 2);
  client.close();
});

test('a fixed token is offered as is, and its expiry (4402) stops the client', async () => {
  const { client, events, sockets, socket } = setup({ token: 'a.b.c' });
  client.connect();
  const ws = await socket(1);
  assert.deepEqual(ws.protocols, ['pushfleet.v1', 'pushfleet.bearer.a.b.c']);
  ws.accept();
  ws.drop(4402, 'access token expired');
  assert.equal(events.closed.at(-1).action, 'stop');
  assert.equal(client.state, 'failed');
  await sleep(40);
  assert.equal(sockets.length, 1);
  client.close();
});

test('a token function that fails or gives no token backs off without opening a socket', async () => {
  let calls = 0;
  const { client, events, sockets } = setup({
    token: () => {
      calls += 1;
      if (calls === 1) throw new Error('auth server down');
      return calls === 2 ? '' : 'x.y.z';
    },
  });
  client.connect();
  await waitFor(() => sockets.length === 1, 'a socket once the token came');
  assert.equal(events.closed[0].code, 1006);
  assert.match(events.closed[0].reason, /auth server down/);
  assert.match(events.closed[1].reason, /gave no token/);
  assert.deepEqual(sockets[0].protocols, ['pushfleet.v1', 'pushfleet.bearer.x.y.z']);
  client.close();
});

test('1012 (worker draining) reconnects within drainDelayMs, without growing the backoff', async () => {
  const { client, events, socket } = setup({ drainDelayMs: 30, baseDelayMs: 1000, maxDelayMs: 5000, random: () => 0.9 });
  client.connect();
  const ws1 = await socket(1);
  ws1.accept({ worker: 'worker-a' });
  const start = Date.now();
  ws1.drop(1012, 'draining');
  const state = events.state.at(-1);
  assert.equal(state.state, 'reconnecting');
  assert.equal(state.code, 1012);
  assert.equal(state.delayMs, 27); // random() * drainDelayMs, not the 1000 ms backoff window
  assert.equal(events.closed.at(-1).action, 'soon');
  const ws2 = await socket(2);
  assert.ok(Date.now() - start < 500, 'reconnected soon after the drain');
  ws2.accept({ worker: 'worker-b' });
  assert.equal(client.worker, 'worker-b');
  assert.equal(events.state.at(-1).attempt, 0);
  client.close();
});

test('backoff doubles per failure in a row, and resets once a connection stayed up', async () => {
  const { client, events, socket } = setup({ baseDelayMs: 2, maxDelayMs: 8, stableAfterMs: 30, random: () => 0.5 });
  client.connect();
  for (let n = 1; n <= 4; n++) (await socket(n)).drop(1006); // never opened
  const delays = events.state.filter((s) => s.state === 'reconnecting').map((s) => [s.attempt, s.delayMs]);
  assert.deepEqual(delays, [
    [1, 1],
    [2, 2],
    [3, 4],
    [4, 4], // capped by maxDelayMs
  ]);
  const ws5 = await socket(5);
  ws5.accept();
  assert.equal(client.state, 'open');
  await sleep(60); // > stableAfterMs
  ws5.drop(1011);
  assert.deepEqual(
    [events.state.at(-1).attempt, events.state.at(-1).delayMs],
    [1, 1],
  );
  await socket(6);
  assert.equal(client.stats.reconnects, 5);
  client.close();
});

test('close() stops every timer: no reconnect, no ping, state closed', async () => {
  const { client, events, sockets, socket } = setup({ baseDelayMs: 10, maxDelayMs: 10, pingIntervalMs: 5 });
  client.connect();
  const ws1 = await socket(1);
  ws1.accept();
  ws1.drop(1006);
  assert.equal(client.state, 'reconnecting');
  client.close(); // while the retry timer runs
  assert.equal(client.state, 'closed');
  await sleep(40);
  assert.equal(sockets.length, 1);

  client.connect(); // starts again
  const ws2 = await socket(2);
  ws2.accept();
  await waitFor(() => ws2.requests('ping').length > 0, 'a ping');
  ws2.push({ type: 'pong', id: ws2.requests('ping')[0].id });
  client.close(); // while the ping timer runs
  assert.deepEqual(ws2.closedWith, { code: 1000, reason: 'client closed' });
  assert.deepEqual(events.closed.at(-1), { code: 1000, reason: 'client closed', action: 'stop' });
  const pings = ws2.requests('ping').length;
  await sleep(30);
  assert.equal(ws2.requests('ping').length, pings, 'no ping after close()');
  assert.equal(sockets.length, 2);
  assert.equal(client.state, 'closed');
});

test('a missing pong drops the socket (4003) and reconnects; answered pings keep it', async () => {
  const { client, events, socket } = setup({ pingIntervalMs: 5, pongTimeoutMs: 15 });
  client.connect();
  const ws1 = await socket(1);
  ws1.accept();
  // Answer three pings: the connection stays.
  for (let n = 1; n <= 3; n++) {
    await waitFor(() => ws1.requests('ping').length >= n, `ping ${n}`);
    ws1.push({ type: 'pong', id: ws1.requests('ping')[n - 1].id });
  }
  assert.equal(client.state, 'open');
  // Then go silent.
  const ws2 = await socket(2);
  assert.deepEqual(ws1.closedWith?.code, 4003);
  assert.equal(events.closed.at(-1).code, 4003);
  assert.equal(events.closed.at(-1).action, 'backoff');
  ws2.accept();
  assert.equal(client.state, 'open');
  client.close();
});

test('a socket never welcomed is given up after connectTimeoutMs', async () => {
  const { client, events, socket } = setup({ connectTimeoutMs: 10 });
  client.connect();
  await socket(1); // never accepted
  const ws2 = await socket(2);
  assert.equal(events.closed[0].code, 1006);
  assert.match(events.closed[0].reason, /welcome/);
  ws2.accept();
  await sleep(20); // the timer of the first socket must not fire on this one
  assert.equal(client.state, 'open');
  client.close();
});

test('errors are reported with their request; unsubscribe stops delivery', async () => {
  const { client, events, socket } = setup();
  client.subscribe('match.1');
  client.subscribe('match.2');
  client.connect();
  const ws1 = await socket(1);
  ws1.accept();
  const [s1, s2] = ws1.requests('subscribe');
  ws1.push({ type: 'ack', id: s1.id, op: 'subscribe', topic: 'match.1' });
  ws1.push({ type: 'error', id: s2.id, code: 'too_many_subscriptions', message: 'max_subscriptions is 1' });
  assert.deepEqual(events.error, [
    { code: 'too_many_subscriptions', message: 'max_subscriptions is 1', id: s2.id, topic: 'match.2' },
  ]);
  assert.equal(client.state, 'open', 'an error reply keeps the connection');
  ws1.message('match.2', 0); // not held: dropped
  client.subscribe('match.1', { last: 5 }); // held: nothing sent
  client.subscribe('match.2'); // refused before: asked again
  assert.deepEqual(
    ws1.requests('subscribe').map((r) => r.topic),
    ['match.1', 'match.2', 'match.2'],
  );
  const retry = ws1.requests('subscribe')[2];
  ws1.push({ type: 'error', id: retry.id, code: 'too_many_subscriptions', message: 'max_subscriptions is 1' });
  assert.equal(client.unsubscribe('match.1'), true);
  const [unsub] = ws1.requests('unsubscribe');
  assert.deepEqual(unsub, { op: 'unsubscribe', id: unsub.id, topic: 'match.1' });
  ws1.message('match.1', 0); // in flight before the unsubscribe: dropped
  assert.equal(events.message.length, 0);
  assert.equal(client.position('match.1'), null);
  assert.equal(client.unsubscribe('match.1'), false);

  // The refused topic is asked for again on the next connection; the forgotten one is not.
  ws1.drop(4001);
  const ws2 = await socket(2);
  ws2.accept();
  assert.deepEqual(
    ws2.requests('subscribe').map((r) => r.topic),
    ['match.2'],
  );
  client.close();
});
