/**
 * pushfleet.js — the browser client of pushfleet's client protocol `pushfleet.v1`
 * (see protocol/PROTOCOL.md, section 2). One ES module, no dependencies, no build step.
 *
 * ```js
 * import { PushfleetClient } from '/pushfleet.js';
 *
 * const client = new PushfleetClient(`wss://${location.host}/ws`);
 * client.addEventListener('message', (e) => {
 *   const { topic, position, payload, replay } = e.detail;
 *   render(topic, payload, { fromHistory: replay });
 * });
 * client.addEventListener('subscribed', (e) => {
 *   // After a reconnect: did we get every message we missed?
 *   if (e.detail.resumed && e.detail.history?.recovered === false) {
 *     clearView(e.detail.topic); // what follows is a fresh start (the last 50)
 *   }
 * });
 * client.addEventListener('state', (e) => showStatus(e.detail.state, e.detail.delayMs));
 * client.subscribe('match.42', { last: 50 }); // catch up with the last 50, then live
 * client.connect();
 * ```
 *
 * In Node 20 (no global WebSocket), pass a class: `new PushfleetClient(url, { WebSocket })`,
 * e.g. the `ws` package's.
 *
 * What the client does for you:
 *
 * - **Resume.** It keeps, per topic, the position `{epoch, offset}` of the last message it
 *   delivered. On every (re)connect it subscribes each topic again with `since` (every message
 *   after that position) and `last` as the fallback when the worker cannot resume. Any worker
 *   can resume any position: publishers stamp positions, not workers.
 * - **Exactly once, in order.** A message at or before the last delivered position of the same
 *   epoch is dropped (`stats.duplicates`); a hole not announced by a `gap` notice is delivered
 *   past but counted (`stats.unexpectedGaps`). A new epoch is a new stream and is accepted.
 *   Messages without a position (live-only) are delivered as they come.
 * - **Reconnect.** The close code decides (see {@link closeAction}): codes a retry cannot fix
 *   stop for good (state `failed`); 1012 (the worker drains for a rollout or scale-in)
 *   reconnects after a short jitter and lands on another worker; everything else backs off
 *   with full jitter, which spreads a fleet's reconnects instead of synchronising them.
 * - **Access tokens.** With `token` (a string, or a function returning one or a promise of
 *   one), every socket offers it as the subprotocol `pushfleet.bearer.<token>` next to
 *   `pushfleet.v1`. A function is called before each socket, so when the worker closes with
 *   4402 (token expired) the client fetches a fresh token and reconnects after a short jitter;
 *   4401 (token refused) and, with a fixed token, 4402 stop for good.
 * - **Liveness.** An app-level ping every `pingIntervalMs`; without the pong within
 *   `pongTimeoutMs` the client gives up on the socket itself (a dead TCP connection can stay
 *   "open" for minutes) and reconnects.
 *
 * Events (`CustomEvent`, payload in `event.detail`):
 *
 * | event        | detail |
 * | ------------ | ------ |
 * | `state`      | `{state, worker, code, reason, attempt, delayMs}` |
 * | `welcome`    | `{worker, connection, extensions}` |
 * | `subscribed` | `{topic, history, resumed}`: `history` is the ack's, or null |
 * | `message`    | `{topic, position, ts, payload, replay}` (+ `payloadBase64` for binary payloads) |
 * | `gap`        | `{topic, epoch, from, to}`: offsets from..=to are lost for good |
 * | `reset`      | `{topic, epoch}`: the topic restarted with a new epoch |
 * | `error`      | `{code, message, id, topic}`: a request was refused; the connection stays |
 * | `closed`     | `{code, reason, action}`: on every socket close; `action` is what happens next |
 *
 * States: `idle` → `connecting` → `open` ⇄ `reconnecting` (waiting, or trying again),
 * ending in `closed` (you called close()) or `failed` (a close code a retry cannot fix).
 *
 * @module pushfleet
 */

/** Offered subprotocols starting with this carry the access token (never selected). */
export const BEARER_PREFIX = 'pushfleet.bearer.';

/** The subprotocol this client speaks. */
export const SUBPROTOCOL = 'pushfleet.v1';

// WebSocket.readyState values; injected WebSocket classes need not define the constants.
const CONNECTING = 0;
const OPEN = 1;

// setTimeout fires at once for delays that do not fit a signed 32-bit integer.
const MAX_TIMER_MS = 2 ** 31 - 1;

// Past this many consecutive failures the backoff is at its cap anyway (2^30 > any cap/base
// ratio worth having); capping the counter keeps it a small number for ever.
const MAX_ATTEMPT = 30;

/**
 * Full-jitter exponential backoff: a delay drawn uniformly from
 * `[0, min(capMs, baseMs * 2^attempt))`. Uniform spread matters more than the mean: when a
 * worker dies, its thousands of clients must not come back in the same instant.
 *
 * @param {number} attempt consecutive failures before this retry, counting from 0
 * @param {number} baseMs the window of the first retry
 * @param {number} capMs the largest window
 * @param {() => number} [random] uniform in [0, 1), `Math.random` unless testing
 * @returns {number} the delay in milliseconds
 */
export function fullJitterDelay(attempt, baseMs, capMs, random = Math.random) {
  return random() * Math.min(capMs, baseMs * 2 ** attempt);
}

/**
 * What to do after the socket closed with `code`:
 *
 * - `'stop'`: retrying cannot help. 1002, 1003, 1007, 1008: the client broke the protocol;
 *   1009: it sent too much; 4400–4499: access control (4401 token missing or refused, and
 *   codes yet to come) — never retry with the same credentials.
 * - `'renew'`: 4402, the access token expired: reconnect after a short jitter with a new
 *   token (the client does so when its `token` option is a function, and stops otherwise).
 * - `'soon'`: 1012, the worker is draining; reconnect after a short jitter and land on
 *   another worker.
 * - `'backoff'`: everything else (1000 we did not ask for, 1001 going away, 1006
 *   connection lost or never opened, 1011, 4001 slow consumer, 4002 idle, 4003 no pong, …).
 *
 * @param {number} code a WebSocket close code
 * @returns {'stop' | 'soon' | 'renew' | 'backoff'}
 */
export function closeAction(code) {
  switch (code) {
    case 1002:
    case 1003:
    case 1007:
    case 1008:
    case 1009:
      return 'stop';
    case 1012:
      return 'soon';
    case 4402:
      return 'renew';
    default:
      return code >= 4400 && code <= 4499 ? 'stop' : 'backoff';
  }
}

/** Defaults of {@link PushfleetClient}'s options. */
const DEFAULTS = Object.freeze({
  protocols: [SUBPROTOCOL],
  token: undefined,
  baseDelayMs: 500,
  maxDelayMs: 30000,
  drainDelayMs: 1000,
  stableAfterMs: 5000,
  pingIntervalMs: 25000,
  pongTimeoutMs: 10000,
  connectTimeoutMs: 15000,
  WebSocket: undefined, // globalThis.WebSocket, looked up when the client is made
  random: Math.random,
});

/**
 * A pushfleet connection that survives: it reconnects, resubscribes and resumes every topic
 * where it left off. See the module documentation for an example.
 *
 * @extends EventTarget
 */
export class PushfleetClient extends EventTarget {
  #url;
  #opts;

  /** @type {'idle'|'connecting'|'open'|'reconnecting'|'closed'|'failed'} */
  #state = 'idle';
  #ws = null;
  #worker = null;
  #extensions = '';
  // Consecutive failed connections; reset once one stays open stableAfterMs.
  #attempt = 0;
  #nextId = 1;

  // topic -> { last, position, ackId, active, replayLeft }. `position` survives reconnects;
  // `ackId` (subscribe sent, no reply yet), `active` (acked) and `replayLeft` belong to the
  // current socket and are reset when it closes. Grows only with the caller's subscribe().
  #topics = new Map();
  // id -> { op, topic, resumed } for requests awaiting a reply on the current socket. Every
  // request gets exactly one reply (ack or error), and the map is cleared with each socket.
  #pending = new Map();

  #retryTimer = null;
  #connectTimer = null;
  #stableTimer = null;
  #pingTimer = null;
  #pongTimer = null;
  #pingId = null;
  #tokenGeneration = 0;

  #stats = { connects: 0, reconnects: 0, messages: 0, replayed: 0, duplicates: 0, unexpectedGaps: 0 };

  /**
   * @param {string | URL} url `ws://` or `wss://` (http(s) is mapped to ws(s); a relative URL
   *   is resolved against the page's location)
   * @param {object} [options]
   * @param {string | string[]} [options.protocols=['pushfleet.v1']] subprotocols offered
   * @param {string | (() => string | Promise<string>)} [options.token] access token, or a
   *   function called before every socket for a fresh one
   * @param {number} [options.baseDelayMs=500] backoff window of the first retry
   * @param {number} [options.maxDelayMs=30000] largest backoff window
   * @param {number} [options.drainDelayMs=1000] jitter window after 1012 (worker draining)
   * @param {number} [options.stableAfterMs=5000] a connection open this long resets the backoff
   * @param {number} [options.pingIntervalMs=25000] app-level ping interval; 0 disables pings
   * @param {number} [options.pongTimeoutMs=10000] a ping unanswered this long drops the socket
   * @param {number} [options.connectTimeoutMs=15000] a socket not welcomed this long after it
   *   was created is dropped (reported as 1006, then backoff); 0 disables
   * @param {typeof WebSocket} [options.WebSocket=globalThis.WebSocket] the WebSocket class
   * @param {() => number} [options.random=Math.random] uniform in [0, 1), for jitter
   * @throws {TypeError} naming the option (or `url`) that is invalid
   */
  constructor(url, options = {}) {
    super();
    this.#url = resolveUrl(url);
    this.#opts = validateOptions(options);
  }

  /** The connection's state: `idle`, `connecting`, `open`, `reconnecting`, `closed` or `failed`. */
  get state() {
    return this.#state;
  }

  /** The id of the worker serving the connection (from its `welcome`), or null. */
  get worker() {
    return this.#worker;
  }

  /** The open socket's negotiated extensions, e.g. `"permessage-deflate; …"`; `''` if none. */
  get extensions() {
    return this.#extensions;
  }

  /**
   * A snapshot of the counters: `connects` (connections welcomed by a worker), `reconnects`
   * (sockets opened by a retry), `messages` (delivered), `replayed` (delivered with
   * `replay: true`), `duplicates` (dropped, already delivered), `unexpectedGaps` (holes not
   * announced by a `gap` notice).
   */
  get stats() {
    return { ...this.#stats };
  }

  /**
   * Opens the connection. Idempotent: does nothing while connecting, open or waiting to
   * reconnect. After close() or a `failed` state it starts again, resuming every topic.
   */
  connect() {
    if (this.#state === 'connecting' || this.#state === 'open' || this.#state === 'reconnecting') {
      return;
    }
    this.#attempt = 0;
    this.#setState('connecting');
    this.#openSocket();
  }

  /**
   * Closes the connection with 1000 and stops every timer; the client does not reconnect until
   * connect() is called again. Subscriptions and positions are kept for that.
   */
  close() {
    if (this.#state === 'closed') return;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    const ws = this.#ws;
    if (ws) {
      this.#detach();
      try {
        ws.close(1000, 'client closed');
      } catch {
        // Already closing: nothing more to ask of it.
      }
      this.#emit('closed', { code: 1000, reason: 'client closed', action: 'stop' });
    }
    this.#setState('closed', { code: 1000, reason: 'client closed' });
  }

  /**
   * Subscribes to `topic`, now if the connection is open and again after every reconnect
   * (resuming from the last delivered message). Subscribing again to a remembered topic
   * updates `last` for the next reconnect, and asks again now if the worker refused it.
   *
   * @param {string} topic an exact topic, e.g. `"match.42"`
   * @param {object} [options]
   * @param {number} [options.last=0] how many recent messages to catch up with when there is
   *   no position to resume from, or the resume fails
   * @throws {TypeError} for an empty topic, control characters, or a bad `last`
   */
  subscribe(topic, { last = 0 } = {}) {
    checkTopic(topic);
    if (!Number.isInteger(last) || last < 0 || last > 0xffffffff) {
      throw new TypeError(`subscribe: last must be an integer from 0 to 4294967295, got ${String(last)}`);
    }
    let t = this.#topics.get(topic);
    if (t) {
      t.last = last;
    } else {
      t = { last, position: null, ackId: null, active: false, replayLeft: 0 };
      this.#topics.set(topic, t);
    }
    // Sends only what this socket neither holds nor awaits: a new topic, or one refused before.
    if (this.#state === 'open') this.#sendSubscribe(topic, t);
  }

  /**
   * Forgets `topic` and its position, unsubscribing now if the connection holds it. Messages
   * of the topic still in flight are dropped.
   *
   * @param {string} topic
   * @returns {boolean} whether the topic was subscribed
   */
  unsubscribe(topic) {
    const t = this.#topics.get(topic);
    if (!t) return false;
    this.#topics.delete(topic);
    if (this.#state === 'open' && (t.active || t.ackId !== null)) {
      const id = this.#nextId++;
      this.#pending.set(id, { op: 'unsubscribe', topic, resumed: false });
      this.#send({ op: 'unsubscribe', id, topic });
    }
    return true;
  }

  /**
   * The position the next resume of `topic` starts after: the last delivered message's, or
   * the end of a `gap` announced right after it. Null when there is none.
   *
   * @param {string} topic
   * @returns {{epoch: string, offset: number} | null}
   */
  position(topic) {
    const p = this.#topics.get(topic)?.position;
    return p ? { epoch: p.epoch, offset: p.offset } : null;
  }

  // --- socket life: open → welcome → frames → close, then decide --------------------------

  #openSocket() {
    const token = this.#opts.token;
    if (token === undefined) {
      this.#openWith(this.#opts.protocols);
      return;
    }
    // One token request at a time; close() or a new connect() meanwhile makes it stale.
    const generation = ++this.#tokenGeneration;
    const stale = () => generation !== this.#tokenGeneration || this.#state === 'closed';
    const failed = (why) => {
      if (!stale()) this.#onClosed(1006, `no access token: ${why}`);
    };
    let pending;
    try {
      pending = typeof token === 'function' ? token() : token;
    } catch (err) {
      failed(err?.message ?? String(err));
      return;
    }
    Promise.resolve(pending).then((value) => {
      if (stale()) return;
      if (typeof value !== 'string' || value === '' || /[^A-Za-z0-9._~+/=-]/.test(value)) {
        failed('the token option gave no token (a non-empty string of JWT characters)');
        return;
      }
      this.#openWith([...this.#opts.protocols, BEARER_PREFIX + value]);
    }, (err) => failed(err?.message ?? String(err)));
  }

  #openWith(protocols) {
    let ws;
    try {
      ws = new this.#opts.WebSocket(this.#url, protocols);
    } catch (err) {
      // The URL was checked up front, so this is the environment refusing (e.g. a CSP).
      this.#onClosed(1006, `cannot open: ${err?.message ?? err}`);
      return;
    }
    this.#ws = ws;
    ws.onopen = () => {
      if (ws !== this.#ws) return;
      this.#extensions = typeof ws.extensions === 'string' ? ws.extensions : '';
      this.#schedulePing();
    };
    ws.onmessage = (event) => {
      if (ws === this.#ws) this.#onFrame(event.data);
    };
    ws.onclose = (event) => {
      if (ws !== this.#ws) return;
      this.#detach();
      this.#onClosed(event.code, event.reason ?? '');
    };
    // An error is always followed by a close, which carries what we need.
    ws.onerror = ignore;
    if (this.#opts.connectTimeoutMs > 0) {
      this.#connectTimer = setTimeout(() => {
        this.#abandon(undefined, 1006, `no welcome within ${this.#opts.connectTimeoutMs} ms`);
      }, this.#opts.connectTimeoutMs);
    }
  }

  #onFrame(data) {
    // pushfleet.v1 is JSON text frames only; anything else is not ours to interpret.
    if (typeof data !== 'string') return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== 'object') return;
    switch (msg.type) {
      case 'welcome':
        return this.#onWelcome(msg);
      case 'ack':
        return this.#onAck(msg);
      case 'error':
        return this.#onError(msg);
      case 'pong':
        return this.#onPong(msg);
      case 'message':
        return this.#onMessage(msg);
      case 'gap':
        return this.#onGap(msg);
      case 'reset':
        return this.#onReset(msg);
      default:
        // Unknown types are ignored: newer workers may add notices.
        return;
    }
  }

  #onWelcome(msg) {
    if (this.#state === 'open') return; // welcome comes once per connection
    clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
    this.#worker = typeof msg.worker === 'string' ? msg.worker : null;
    this.#stats.connects += 1;
    this.#stableTimer = setTimeout(() => {
      this.#stableTimer = null;
      this.#attempt = 0;
    }, this.#opts.stableAfterMs);
    // Subscribe before telling listeners: a subscribe() of theirs then goes out once, on its own.
    for (const [topic, t] of this.#topics) this.#sendSubscribe(topic, t);
    this.#setState('open');
    if (this.#state !== 'open') return; // a listener closed the client
    this.#emit('welcome', {
      worker: this.#worker,
      connection: typeof msg.connection === 'number' ? msg.connection : null,
      extensions: this.#extensions,
    });
  }

  #onAck(msg) {
    const req = this.#pending.get(msg.id);
    if (!req) return;
    this.#pending.delete(msg.id);
    if (req.op !== 'subscribe') return;
    const t = this.#topics.get(req.topic);
    // Unsubscribed (and maybe subscribed again) since: a later ack is the one that counts.
    if (!t || t.ackId !== msg.id) return;
    t.ackId = null;
    t.active = true;
    const history = msg.history && typeof msg.history === 'object' ? msg.history : null;
    const replayed = history?.replayed;
    t.replayLeft = Number.isInteger(replayed) && replayed > 0 ? replayed : 0;
    // Per protocol: drop what you hold for the topic and use what follows. Offsets we
    // delivered before may come again (the `last` fallback), and they must not be deduplicated.
    if (req.resumed && history?.recovered === false) t.position = null;
    this.#emit('subscribed', { topic: req.topic, history, resumed: req.resumed });
  }

  #onError(msg) {
    const id = typeof msg.id === 'number' ? msg.id : null;
    const req = id === null ? undefined : this.#pending.get(id);
    if (req) {
      this.#pending.delete(id);
      const t = req.op === 'subscribe' ? this.#topics.get(req.topic) : undefined;
      // The topic stays remembered, inactive on this socket, and is tried again on reconnect.
      if (t && t.ackId === id) t.ackId = null;
    }
    this.#emit('error', {
      code: String(msg.code ?? 'unknown'),
      message: String(msg.message ?? ''),
      id,
      topic: req?.topic ?? null,
    });
  }

  #onPong(msg) {
    if (this.#pingId === null || msg.id !== this.#pingId) return;
    this.#pingId = null;
    clearTimeout(this.#pongTimer);
    this.#pongTimer = null;
    this.#schedulePing();
  }

  #onMessage(msg) {
    const t = this.#topics.get(msg.topic);
    // Not subscribed, or our subscribe is not acked yet: the worker sends the ack before
    // anything of the subscription, so this belongs to an older one we gave up.
    if (!t || !t.active) return;
    const position = readPosition(msg.position);
    let replay = false;
    if (position) {
      if (t.replayLeft > 0) {
        t.replayLeft -= 1;
        replay = true;
      }
      const last = t.position;
      if (last && last.epoch === position.epoch) {
        if (position.offset <= last.offset) {
          this.#stats.duplicates += 1;
          return;
        }
        if (position.offset > last.offset + 1) this.#stats.unexpectedGaps += 1;
      }
      t.position = position;
    }
    this.#stats.messages += 1;
    if (replay) this.#stats.replayed += 1;
    const detail = {
      topic: msg.topic,
      position: position ? { epoch: position.epoch, offset: position.offset } : null,
      ts: typeof msg.ts === 'number' ? msg.ts : null,
      payload: msg.payload,
      replay,
    };
    if (typeof msg.payload_base64 === 'string') detail.payloadBase64 = msg.payload_base64;
    this.#emit('message', detail);
  }

  #onGap(msg) {
    const t = this.#topics.get(msg.topic);
    if (!t || typeof msg.epoch !== 'string' || !isOffset(msg.from) || !isOffset(msg.to)) return;
    // The lost offsets will never come, and the worker's history restarts after them: resuming
    // from before the gap would answer too_old. Step over a gap that starts right after what
    // we hold, so the next message is expected and a later resume still recovers.
    const p = t.position;
    if (p && p.epoch === msg.epoch && msg.from <= p.offset + 1 && msg.to > p.offset) {
      t.position = { epoch: p.epoch, offset: msg.to };
    }
    this.#emit('gap', { topic: msg.topic, epoch: msg.epoch, from: msg.from, to: msg.to });
  }

  #onReset(msg) {
    const t = this.#topics.get(msg.topic);
    if (!t || typeof msg.epoch !== 'string') return;
    // Positions of the old epoch mean nothing any more.
    t.position = null;
    this.#emit('reset', { topic: msg.topic, epoch: msg.epoch });
  }

  /** Gives up on the current socket without waiting for its close handshake (it may be dead). */
  #abandon(wireCode, code, reason) {
    const ws = this.#ws;
    if (!ws) return;
    this.#detach();
    try {
      if (wireCode === undefined || ws.readyState === CONNECTING) ws.close();
      else ws.close(wireCode, reason.slice(0, 120));
    } catch {
      // Closing a closing socket: nothing to do.
    }
    this.#onClosed(code, reason);
  }

  /** Stops listening to the current socket and forgets everything tied to it. */
  #detach() {
    const ws = this.#ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      // Not null: Node's `ws` package throws on an 'error' event nobody listens to, and an
      // abandoned socket may still report one.
      ws.onerror = ignore;
    }
    this.#ws = null;
    for (const timer of [this.#connectTimer, this.#stableTimer, this.#pingTimer, this.#pongTimer]) {
      clearTimeout(timer);
    }
    this.#connectTimer = this.#stableTimer = this.#pingTimer = this.#pongTimer = null;
    this.#pingId = null;
    this.#pending.clear();
    for (const t of this.#topics.values()) {
      t.ackId = null;
      t.active = false;
      t.replayLeft = 0;
    }
    this.#worker = null;
    this.#extensions = '';
  }

  /** The socket is gone (already detached): report it and decide what comes next. */
  #onClosed(code, reason) {
    let action = closeAction(code);
    if (action === 'renew' && typeof this.#opts.token !== 'function') action = 'stop';
    this.#emit('closed', { code, reason, action });
    // A listener may have called close() or connect(); that decision wins.
    if (this.#ws || this.#state === 'closed' || this.#retryTimer) return;
    if (action === 'stop') {
      this.#setState('failed', { code, reason });
      return;
    }
    let delayMs;
    if (action === 'soon' || action === 'renew') {
      delayMs = this.#opts.random() * this.#opts.drainDelayMs;
    } else {
      // The counter was reset if the connection stayed up stableAfterMs; otherwise this is one
      // more failure in a row and the window doubles.
      delayMs = fullJitterDelay(this.#attempt, this.#opts.baseDelayMs, this.#opts.maxDelayMs, this.#opts.random);
      this.#attempt = Math.min(this.#attempt + 1, MAX_ATTEMPT);
    }
    delayMs = Math.min(Math.max(0, delayMs || 0), MAX_TIMER_MS);
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      this.#stats.reconnects += 1;
      this.#openSocket();
    }, delayMs);
    this.#setState('reconnecting', { code, reason, delayMs }, true);
  }

  // --- requests ---------------------------------------------------------------------------

  #sendSubscribe(topic, t) {
    if (t.active || t.ackId !== null) return; // already held or asked for on this socket
    const id = this.#nextId++;
    const req = { op: 'subscribe', id, topic };
    const resumed = t.position !== null;
    if (resumed) req.since = { epoch: t.position.epoch, offset: t.position.offset };
    if (t.last > 0) req.last = t.last;
    t.ackId = id;
    this.#pending.set(id, { op: 'subscribe', topic, resumed });
    this.#send(req);
  }

  #schedulePing() {
    if (this.#opts.pingIntervalMs === 0) return;
    clearTimeout(this.#pingTimer);
    this.#pingTimer = setTimeout(() => {
      this.#pingTimer = null;
      this.#pingId = this.#nextId++;
      this.#send({ op: 'ping', id: this.#pingId });
      this.#pongTimer = setTimeout(() => {
        // 4003 is what a worker says when *our* pong is missing: same meaning, same handling.
        this.#abandon(4003, 4003, `no pong within ${this.#opts.pongTimeoutMs} ms`);
      }, this.#opts.pongTimeoutMs);
    }, this.#opts.pingIntervalMs);
  }

  #send(obj) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== OPEN) return;
    try {
      ws.send(JSON.stringify(obj));
    } catch {
      // The socket is closing; its close event takes it from here.
    }
  }

  // --- events -----------------------------------------------------------------------------

  #setState(state, { code = null, reason = null, delayMs = null } = {}, always = false) {
    if (this.#state === state && !always) return;
    this.#state = state;
    this.#emit('state', {
      state,
      worker: this.#worker,
      code,
      reason,
      attempt: this.#attempt,
      delayMs,
    });
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

// --- validation ---------------------------------------------------------------------------

function resolveUrl(url) {
  if (typeof url !== 'string' && !(url instanceof URL)) {
    throw new TypeError(`url must be a string or a URL, got ${typeof url}`);
  }
  let parsed;
  try {
    parsed = new URL(String(url), globalThis.location?.href);
  } catch {
    throw new TypeError(`url: cannot parse ${JSON.stringify(String(url))} as an absolute URL`);
  }
  const schemes = { 'ws:': 'ws:', 'wss:': 'wss:', 'http:': 'ws:', 'https:': 'wss:' };
  const scheme = schemes[parsed.protocol];
  if (!scheme) throw new TypeError(`url: scheme must be ws: or wss:, got ${parsed.protocol}`);
  if (parsed.hash) throw new TypeError('url: a WebSocket URL cannot have a #fragment');
  parsed.protocol = scheme;
  return parsed.href;
}

function validateOptions(options) {
  if (options === null || typeof options !== 'object') {
    throw new TypeError('options must be an object');
  }
  for (const key of Object.keys(options)) {
    if (!Object.hasOwn(DEFAULTS, key)) throw new TypeError(`unknown option ${JSON.stringify(key)}`);
  }
  const opts = { ...DEFAULTS };
  for (const [key, value] of Object.entries(options)) {
    if (value !== undefined) opts[key] = value;
  }
  const ms = (name, { min = 0 } = {}) => {
    const v = opts[name];
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > MAX_TIMER_MS) {
      throw new TypeError(`options.${name} must be a number of milliseconds from ${min} to ${MAX_TIMER_MS}, got ${String(v)}`);
    }
  };
  ms('baseDelayMs', { min: 1 });
  ms('maxDelayMs', { min: 1 });
  if (opts.maxDelayMs < opts.baseDelayMs) {
    throw new TypeError(`options.maxDelayMs (${opts.maxDelayMs}) must not be below options.baseDelayMs (${opts.baseDelayMs})`);
  }
  ms('drainDelayMs');
  ms('stableAfterMs');
  ms('pingIntervalMs');
  ms('pongTimeoutMs', { min: 1 });
  ms('connectTimeoutMs');

  const protocols = typeof opts.protocols === 'string' ? [opts.protocols] : opts.protocols;
  if (!Array.isArray(protocols) || protocols.some((p) => typeof p !== 'string' || p === '')) {
    throw new TypeError('options.protocols must be a non-empty string or an array of them');
  }
  opts.protocols = [...protocols];
  if (opts.token !== undefined && typeof opts.token !== 'function' &&
      (typeof opts.token !== 'string' || opts.token === '')) {
    throw new TypeError('options.token must be a non-empty string or a function returning one');
  }

  opts.WebSocket ??= globalThis.WebSocket;
  if (typeof opts.WebSocket !== 'function') {
    throw new TypeError('options.WebSocket: no WebSocket class available here; pass one (e.g. the ws package)');
  }
  if (typeof opts.random !== 'function') {
    throw new TypeError('options.random must be a function returning a number in [0, 1)');
  }
  return Object.freeze(opts);
}

function checkTopic(topic) {
  if (typeof topic !== 'string' || topic === '') {
    throw new TypeError('topic must be a non-empty string');
  }
  // The worker refuses these (invalid_topic); refusing here says where the mistake is.
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(topic)) {
    throw new TypeError(`topic ${JSON.stringify(topic)} contains control characters`);
  }
}

function ignore() {}

function isOffset(n) {
  return Number.isSafeInteger(n) && n >= 0;
}

function readPosition(p) {
  if (!p || typeof p !== 'object' || typeof p.epoch !== 'string' || !isOffset(p.offset)) return null;
  return { epoch: p.epoch, offset: p.offset };
}
