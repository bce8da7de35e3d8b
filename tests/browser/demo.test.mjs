// The demo page in a real browser (Debian's Chromium, driven by playwright-core), against the
// real local fleet started by the same launcher as `cargo run --release`:
//   1. the page shows each match's feed live; reloaded, it shows history first, then live;
//   2. Chromium negotiated permessage-deflate itself;
//   3. the worker serving the page is killed (SIGKILL): the page reconnects to another worker,
//      resumes every feed ("recovered"), and the feeds have no gap and no duplicate;
//   4. a screenshot is written; Ctrl-C (SIGINT) stops the fleet cleanly.
// Every wait has a deadline. Environment: PUSHFLEET_BIN (default target/release/pushfleet),
// PUSHFLEET_PORT_OFFSET (default 400), CHROMIUM (default /usr/bin/chromium),
// BROWSER_ARTIFACTS (default target/browser).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const repo = path.resolve(import.meta.dirname, '../..');
const bin = process.env.PUSHFLEET_BIN ?? path.join(repo, 'target/release/pushfleet');
const portOffset = process.env.PUSHFLEET_PORT_OFFSET ?? '400';
const chromiumPath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const artifacts = process.env.BROWSER_ARTIFACTS ?? path.join(repo, 'target/browser');
const TOPICS = ['match.1', 'match.2', 'match.3'];

/** Polls `probe` until it returns a truthy value, at most `ms`; the error says what was awaited. */
async function until(what, probe, ms) {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await probe();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last})`);
}

/** The fleet's output, last lines kept for a failure report. */
function keepTail(stream, lines) {
  let partial = '';
  stream.on('data', (chunk) => {
    const parts = (partial + chunk).split('\n');
    partial = parts.pop();
    lines.push(...parts);
    if (lines.length > 400) lines.splice(0, lines.length - 400);
  });
}

/** Per topic: items since load, as the page recorded them (see demo.html's testing contract). */
const feeds = (page) => page.evaluate(() => window.pushfleetDemo.feeds);

/** Whether `items` (one topic's feed) form one run of consecutive offsets of one epoch. */
function checkRun(topic, items) {
  const resets = items.filter((i) => i.reset);
  assert.deepEqual(resets, [], `${topic}: the page had to start over: ${JSON.stringify(resets)}`);
  assert.ok(items.length > 0, `${topic}: nothing arrived`);
  const epochs = new Set(items.map((i) => i.epoch));
  assert.equal(epochs.size, 1, `${topic}: more than one epoch: ${[...epochs]}`);
  for (let k = 1; k < items.length; k++) {
    const [prev, item] = [items[k - 1].offset, items[k].offset];
    assert.equal(item, prev + 1, `${topic}: offset ${item} follows ${prev} (${item <= prev ? 'duplicate' : 'gap'})`);
  }
}

test('the demo page follows live matches, and survives its worker being killed', { timeout: 240_000 }, async (t) => {
  assert.ok(fs.existsSync(bin), `${bin} is missing: build it with cargo build --release -p pushfleet`);
  fs.mkdirSync(artifacts, { recursive: true });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pushfleet-browser-'));
  const announce = path.join(dir, 'fleet.json');
  const output = [];
  // Fast matches (a moment every few hundred ms per match) and no restart: the killed worker
  // stays dead, so the page must move.
  const fleet = spawn(
    bin,
    ['--port-offset', portOffset, '--minute', '250ms', '--restart-after', '0s', '--announce-file', announce],
    { cwd: repo, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  keepTail(fleet.stdout, output);
  keepTail(fleet.stderr, output);
  const exited = once(fleet, 'exit');
  let browser;
  t.after(async () => {
    await browser?.close().catch(() => {});
    if (fleet.exitCode === null && fleet.signalCode === null) fleet.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const report = (e) => {
    e.message += `\n--- fleet output (last lines) ---\n${output.slice(-80).join('\n')}`;
    throw e;
  };

  try {
    const info = await until('the fleet to come up', () => fs.existsSync(announce) && JSON.parse(fs.readFileSync(announce, 'utf8')), 60_000);
    browser = await chromium.launch({
      executablePath: chromiumPath,
      args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const pageErrors = [];
    page.on('pageerror', (e) => pageErrors.push(e.message));
    page.on('console', (m) => m.type() === 'error' && pageErrors.push(m.text()));

    // 1. Live first, then a reload: the new page gets history, then live moments.
    await page.goto(info.demo);
    await page.waitForFunction(
      (topics) => topics.every((t) => (window.pushfleetDemo.feeds[t] ?? []).length >= 2),
      TOPICS, { timeout: 60_000 });
    await page.reload();
    await page.waitForFunction(
      (topics) => topics.every((t) => {
        const items = window.pushfleetDemo.feeds[t] ?? [];
        return items.some((i) => i.replay) && items.filter((i) => !i.replay).length >= 2;
      }),
      TOPICS, { timeout: 60_000 });
    for (const [topic, items] of Object.entries(await feeds(page))) {
      const firstLive = items.findIndex((i) => !i.replay);
      assert.ok(firstLive > 0, `${topic}: history first`);
      assert.ok(items.slice(firstLive).every((i) => !i.replay), `${topic}: no history after live moments`);
      checkRun(topic, items);
    }
    for (const topic of TOPICS) {
      const section = page.locator(`section[data-topic="${topic}"]`);
      assert.ok(await section.locator('li[data-offset].history').count() > 0, `${topic}: history items shown`);
      assert.ok(await section.locator('li[data-offset].live').count() > 0, `${topic}: live items shown`);
    }

    // 2. Chromium negotiated permessage-deflate itself (its offer, the worker's answer).
    const extensions = await page.evaluate(() => window.pushfleetDemo.client.extensions);
    assert.match(extensions, /permessage-deflate/, `negotiated extensions: ${extensions}`);
    assert.match(await page.textContent('#compression'), /permessage-deflate/);

    // 3. Kill the worker serving the page.
    const served = (await page.textContent('#worker')).trim();
    const victim = info.workers.find((w) => w.id === served);
    assert.ok(victim, `the page names a worker of the fleet: ${served}`);
    const before = Object.fromEntries(Object.entries(await feeds(page)).map(([t, items]) => [t, items.length]));
    process.kill(victim.pid, 'SIGKILL');
    await page.waitForFunction(
      (gone) => {
        const { client } = window.pushfleetDemo;
        return client.state === 'open' && client.worker && client.worker !== gone;
      },
      served, { timeout: 60_000 });
    const now = (await page.textContent('#worker')).trim();
    assert.notEqual(now, served, 'the page moved to another worker');
    assert.ok(Number(await page.textContent('#reconnects')) >= 1, 'a reconnect is counted');
    // Every feed resumed ("recovered") and goes on live from the new worker.
    await page.waitForFunction(
      ({ topics, before, now }) => topics.every((t) => {
        const items = window.pushfleetDemo.feeds[t];
        return items.slice(before[t]).filter((i) => !i.replay && i.worker === now).length >= 2;
      }),
      { topics: TOPICS, before, now }, { timeout: 60_000 });
    for (const topic of TOPICS) {
      const resume = await page.textContent(`section[data-topic="${topic}"] .resume`);
      assert.match(resume, /recovered ✓/, `${topic}: ${resume}`);
    }
    for (const [topic, items] of Object.entries(await feeds(page))) checkRun(topic, items);
    const stats = await page.evaluate(() => window.pushfleetDemo.client.stats);
    assert.equal(stats.duplicates, 0, 'the client dropped no duplicate');
    assert.equal(stats.unexpectedGaps, 0, 'the client saw no gap');
    assert.deepEqual(pageErrors, [], 'no error in the page');

    // 4. A screenshot, then Ctrl-C stops the fleet cleanly.
    const shot = path.join(artifacts, 'demo.png');
    await page.screenshot({ path: shot, fullPage: true });
    console.log(`screenshot: ${shot}; served by ${served}, then ${now}; stats ${JSON.stringify(stats)}`);
    await browser.close();
    browser = undefined;
    fleet.kill('SIGINT');
    let timer;
    const [code, signal] = await Promise.race([
      exited,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error('the fleet did not stop within 40 s of SIGINT')), 40_000);
      }),
    ]).finally(() => clearTimeout(timer));
    assert.equal(signal, null);
    assert.equal(code, 0, 'every remaining process stopped cleanly');
  } catch (e) {
    report(e);
  }
});
