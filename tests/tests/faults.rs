//! The fault suite: the faults a fleet meets in production, each with what clients and operators
//! must see when it happens.
//!
//! 1. A worker killed under publish load: `a_killed_worker_s_clients_all_resume_and_the_proxy_
//!    refuses_none` (first covered in `fleet_end_to_end.rs`).
//! 2. Herald down, then restarted, under connection churn: `herald_down_and_restarted_under_
//!    churn_fails_no_connection_and_its_view_returns` (first in `proxy_fleet.rs`).
//! 3. A publisher restart: `a_restarted_publisher_resets_every_client_and_old_positions_never_
//!    replay`, `a_worker_hearing_the_new_epoch_first_never_fills_from_a_peer_s_old_epoch`
//!    (first in `history.rs`).
//! 4. A client that reads nothing: `slow_consumers_are_closed_with_4001_and_everyone_else_gets_
//!    every_message` (first in `worker_fanout.rs`).
//! 5. SIGTERM drain of thousands of clients: `sigterm_closes_two_thousand_clients_at_the_drain_
//!    rate_and_all_resume_elsewhere` (first in `worker_fanout.rs`, with 20 clients).
//! 6. Bad input: `broken_frames_get_their_close_code_directly_and_through_the_proxy`,
//!    `a_deflate_bomb_is_closed_with_1009_before_it_costs_memory`,
//!    `bad_requests_get_their_error_code_and_the_connection_stays`,
//!    `requests_with_fields_of_the_wrong_type_get_bad_request_with_their_id`,
//!    `bad_handshake_lines_get_400_from_the_worker_and_the_proxy`,
//!    `slowloris_handshakes_get_408_while_still_trickling` (first in `worker_limits.rs` and
//!    `proxy_relay.rs`).
//!
//! The tests here assert what those first tests leave out: the proxy's admission counters
//! during a reconnect herd, the stale and fallback placement states and herald's recovery, a
//! real publisher restart and old-epoch messages arriving late, whole streams for the clients
//! that keep up, the drain's pace measured per window, and the inputs nobody sent before.
//!
//! Tests that hold hundreds or thousands of sockets, or measure the process's memory, take
//! [`HEAVY`] so they never overlap: together they would pass the open-files limit, and one's
//! allocations would blur the other's memory figure.

use anyhow::{bail, ensure, Context, Result};
use harness::client::raw_upgrade;
use harness::fleet::{slots_only, KillableWorker, TestHerald, TestProxy};
use harness::{eventually, http_request, metric_value, Publisher, TestWorker, WsClient};
use protocol::client::close;
use protocol::Position;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Longest wait for any one condition.
const WAIT: Duration = Duration::from_secs(20);
/// Report interval of workers and herald in the fleet tests.
const INTERVAL: Duration = Duration::from_millis(200);
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Held by the tests that need many sockets or a clean memory figure (see the module doc).
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// 1. A worker killed under publish load.
// ---------------------------------------------------------------------------------------------

/// 300 clients on three topics through a proxy whose admission is sized for them (a burst of
/// one fleet's worth, that many a second, room for every client twice). The busiest worker is
/// killed mid-stream. Every client that lost its worker resumes on another, `recovered`, with
/// every offset once and in order; and the proxy admitted every reconnect at its first attempt
/// (no refusal of any kind, one accepted connection per session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_clients_all_resume_and_the_proxy_refuses_none() -> Result<()> {
    const CLIENTS: usize = 300;
    const TOPICS: usize = 3;
    const PRELUDE: u64 = 10;
    const MESSAGES: u64 = 120;
    const KILL_AT: u64 = 60;
    const ROUND: Duration = Duration::from_millis(25);
    let _heavy = HEAVY.lock().await;
    let herald = TestHerald::start_slots_only(INTERVAL).await?;
    let mut publisher = Publisher::bind().await?;
    let mut workers = ["a", "b", "c"]
        .iter()
        .map(|id| {
            KillableWorker::start(id, &herald.url(), INTERVAL, |c| {
                c.publishers = vec![publisher.endpoint.clone()];
                c.history = vec!["m.*,messages=1000".parse().expect("valid rule")];
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let admins: Vec<SocketAddr> = workers.iter().map(|w| w.admin_addr).collect();
    until_heard(&mut publisher, "m.warm", &admins).await?;
    eventually(WAIT, "herald lists the three workers", || async {
        herald
            .table()
            .await
            .is_ok_and(|t| t.eligible().count() == 3)
    })
    .await?;
    let proxy = TestProxy::start(&[], |c| {
        c.herald = Some(herald.url());
        c.accept_burst = CLIENTS as u32;
        c.accept_rate = CLIENTS as f64;
        c.max_connections = 2 * CLIENTS;
    })
    .await?;
    eventually(WAIT, "the proxy has herald's table", || async {
        proxy.knows_eligible(3)
    })
    .await?;
    let epoch = epoch_hex(publisher.epoch);
    for offset in 0..PRELUDE {
        publish_round(&mut publisher, TOPICS, offset).await?;
    }
    let (mut clients, placed) = start_followers(CLIENTS, |i| {
        Follower::new(
            i,
            topic(i % TOPICS),
            &epoch,
            MESSAGES - 1,
            vec![proxy.addr()],
        )
    })
    .await?;
    let per_worker = count_by_worker(&placed);
    ensure!(per_worker.len() > 1, "clients spread out: {per_worker:?}");
    let (victim, victims_clients) = per_worker
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(w, n)| (w.clone(), *n))
        .context("clients were placed")?;

    let mut tick = tokio::time::interval(ROUND);
    for offset in PRELUDE..MESSAGES {
        tick.tick().await;
        if offset == KILL_AT {
            workers
                .iter_mut()
                .find(|w| w.id == victim)
                .context("the victim is one of ours")?
                .kill();
        }
        publish_round(&mut publisher, TOPICS, offset).await?;
    }
    let logs = join_followers(&mut clients, Duration::from_secs(60)).await?;

    for log in &logs {
        log.check()?;
        let who = log.who();
        if log.workers[0] == victim {
            ensure!(
                log.workers.len() == 2 && log.losses.len() == 1 && log.resumes.len() == 1,
                "{who}: one loss, one reconnect, one resume expected: {:?}",
                log.losses
            );
            ensure!(log.workers[1] != victim, "{who} landed on the dead worker");
            let loss = &log.losses[0];
            ensure!(
                loss.worker == victim,
                "{who} lost {}, which was not killed: {}",
                loss.worker,
                loss.why
            );
        } else {
            ensure!(
                log.workers.len() == 1 && log.losses.is_empty(),
                "{who}: a survivor's client kept its connection: {:?}",
                log.losses
            );
        }
    }
    let sessions: usize = logs.iter().map(|l| l.workers.len()).sum();
    assert_eq!(sessions, CLIENTS + victims_clients);
    assert_eq!(
        proxy.metric("proxy_refused_total"),
        0.0,
        "the reconnect herd stayed within the proxy's admission limits"
    );
    assert_eq!(
        proxy.metric("proxy_connections_accepted_total"),
        sessions as f64,
        "every reconnect was admitted at its first attempt"
    );
    eprintln!(
        "killed {victim} holding {victims_clients} of {CLIENTS} clients ({per_worker:?}); all \
         resumed, {} proxy dials retried on another worker",
        proxy.metric("proxy_connect_retries_total")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Herald down, then restarted, under connection churn.
// ---------------------------------------------------------------------------------------------

/// Herald goes away while clients keep connecting and leaving through the proxy, stays away
/// long enough for the proxy's table to go stale and then to fallback placement, and comes
/// back (a new process on the same address). No connection is refused or fails at any point;
/// the restarted herald trusts every worker, at full weight, by each worker's third report at
/// the latest; and the proxy follows the new herald's table.
///
/// Production runs with 2 s reports, `--stale-after 6s`, `--fallback-after 30s`. Here the
/// reports and the proxy's thresholds are scaled down tenfold (stale after 600 ms, fallback
/// after 3 s) while the outage keeps its real length, `HERALD_DOWN`: the proxy goes
/// fresh → stale → fallback within seconds and then places on its own for the rest of the
/// 30 s: thousands of connections placed with no herald at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_down_and_restarted_under_churn_fails_no_connection_and_its_view_returns(
) -> Result<()> {
    const REPORT: Duration = Duration::from_millis(300);
    const STALE_AFTER: Duration = Duration::from_millis(600);
    const FALLBACK_AFTER: Duration = Duration::from_secs(3);
    const CHURNERS: usize = 4;
    const HELD: usize = 30;
    const HERALD_DOWN: Duration = Duration::from_secs(30);
    let first = TestHerald::start(|c| slots_only(c, REPORT)).await?;
    let herald_addr = first.herald.http_addr;
    let url = first.url();
    let _workers = ["a", "b", "c"]
        .iter()
        .map(|id| KillableWorker::start(id, &url, REPORT, |_| {}))
        .collect::<Result<Vec<_>>>()?;
    eventually(WAIT, "herald trusts the three workers", || async {
        first.table().await.is_ok_and(|t| t.eligible().count() == 3)
    })
    .await?;
    let proxy = TestProxy::start(&[], |c| {
        c.herald = Some(url.clone());
        c.stale_after = STALE_AFTER;
        c.fallback_after = FALLBACK_AFTER;
    })
    .await?;
    eventually(WAIT, "the proxy has a fresh table", || async {
        proxy.knows_eligible(3) && proxy.metric("proxy_placement_mode{mode=\"fresh\"}") == 1.0
    })
    .await?;
    let mut held = Vec::new();
    for _ in 0..HELD {
        held.push(proxy.client(false).await?);
    }
    let stop = CancellationToken::new();
    let churners: Vec<_> = (0..CHURNERS)
        .map(|_| tokio::spawn(churn(proxy.addr(), stop.clone())))
        .collect();
    let _stop_churn = stop.clone().drop_guard();
    let placed = |mode: &str| proxy.metric(&format!("proxy_placements_total{{mode=\"{mode}\""));
    eventually(WAIT, "churn placed with herald up", || async {
        placed("fresh") >= (HELD + 20) as f64
    })
    .await?;

    first.shutdown.cancel();
    tokio::time::timeout(WAIT, first.herald.wait())
        .await
        .context("herald did not stop")?;
    let outage = Instant::now();
    eventually(WAIT, "churn placed in fallback mode", || async {
        placed("fallback") >= 5.0
    })
    .await?;
    tokio::time::sleep(HERALD_DOWN.saturating_sub(outage.elapsed())).await;
    let (stale, fallback) = (placed("stale"), placed("fallback"));
    ensure!(stale > 0.0, "no placement while the table was stale");
    ensure!(
        fallback >= (HERALD_DOWN - FALLBACK_AFTER).as_secs_f64(),
        "churn stopped being placed in fallback mode during the outage: only {fallback} \
         placements in {HERALD_DOWN:?}"
    );

    let second = TestHerald::start(|c| {
        slots_only(c, REPORT);
        c.listen = herald_addr;
        // Workers as old as these are past slow start: a restarted herald must see that.
        c.slow_start = Duration::from_secs(2);
    })
    .await?;
    let restarted = Instant::now();
    let down_for = restarted - outage;
    let view: Arc<Mutex<Option<Value>>> = Arc::default();
    eventually(WAIT, "the restarted herald trusts every worker", || {
        let view = view.clone();
        async move {
            let Ok((200, body)) = http_request(herald_addr, "GET", "/v1/status").await else {
                return false;
            };
            let Ok(status) = serde_json::from_str::<Value>(&body) else {
                return false;
            };
            let workers = status["workers"].as_array().cloned().unwrap_or_default();
            let complete = workers.len() == 3
                && workers
                    .iter()
                    .all(|w| w["trusted"] == true && w["slow_start"] == 1.0);
            if complete {
                *view.lock().expect("not poisoned") = Some(status);
            }
            complete
        }
    })
    .await?;
    let recovered_in = restarted.elapsed();
    let status = view
        .lock()
        .expect("not poisoned")
        .take()
        .context("a view")?;
    for w in status["workers"].as_array().context("workers")? {
        let reports = w["reports"].as_u64().context("reports")?;
        ensure!(
            (1..=3).contains(&reports),
            "herald's view of {} took {reports} reports (3 report intervals allowed): {w}",
            w["id"]
        );
    }
    let connections: u64 = status["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["connections"].as_u64())
        .sum();
    ensure!(
        connections >= HELD as u64,
        "the view counts the held clients: {connections}"
    );
    let generation = status["generation"].as_u64().context("generation")?;
    let table = second.table().await?;
    ensure!(
        table.generation == generation && table.eligible().count() == 3,
        "the restarted herald's table: {table:?}"
    );
    let fresh_before = placed("fresh");
    eventually(WAIT, "the proxy follows the restarted herald", || async {
        proxy.metric("proxy_table_generation") == generation as f64
            && proxy.metric("proxy_placement_mode{mode=\"fresh\"}") == 1.0
            && placed("fresh") >= fresh_before + 5.0
    })
    .await?;

    stop.cancel();
    let mut attempts = 0;
    for churner in churners {
        let (n, failures) = tokio::time::timeout(WAIT, churner).await???;
        ensure!(
            failures.is_empty(),
            "{} of {n} failed: {failures:?}",
            failures.len()
        );
        attempts += n;
    }
    for c in held.iter_mut() {
        c.send_json(json!({"op": "ping", "id": 2})).await?;
        assert_eq!(c.recv_json().await?["type"], "pong", "held clients kept");
    }
    assert_eq!(proxy.metric("proxy_refused_total"), 0.0);
    assert_eq!(proxy.metric("proxy_connect_failures_total"), 0.0);
    eprintln!(
        "{attempts} churned connections, none failed; herald down {down_for:.1?} ({stale} placed \
         stale, {fallback} in fallback); its view was back {recovered_in:.1?} after the restart"
    );
    Ok(())
}

/// Connects through the proxy, pings, leaves; again and again until `stop` (at most 5,000
/// times). Returns the attempts and what went wrong with each failed one.
async fn churn(proxy: SocketAddr, stop: CancellationToken) -> Result<(u64, Vec<String>)> {
    let mut attempts = 0;
    let mut failures = Vec::new();
    while !stop.is_cancelled() && attempts < 5_000 {
        attempts += 1;
        let once = async {
            let mut c = WsClient::connect(proxy, "/ws", attempts % 2 == 0, &[]).await?;
            let welcome = c.recv_json().await?;
            ensure!(welcome["type"] == "welcome", "{welcome}");
            c.send_json(json!({"op": "ping", "id": 1})).await?;
            let pong = c.recv_json().await?;
            ensure!(pong["type"] == "pong", "{pong}");
            anyhow::Ok(())
        };
        if let Err(e) = once.await {
            failures.push(format!("{e:#}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((attempts, failures))
}

// ---------------------------------------------------------------------------------------------
// 3. A publisher restart.
// ---------------------------------------------------------------------------------------------

/// The publisher process restarts for real: its socket closes and a new one binds the same
/// endpoint with a new epoch. Every client, on either worker and by topic or prefix, gets one
/// `reset` before the new epoch's first message and nothing of the old epoch after it. A
/// resume from an old-epoch position is `epoch_changed` on both workers, even when its offset
/// exists in the new epoch, and replays only new-epoch messages. An old-epoch message arriving
/// late is dropped as stale: nobody receives it and no second reset follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_publisher_resets_every_client_and_old_positions_never_replay() -> Result<()> {
    let mut old = Publisher::bind().await?;
    let endpoint = old.endpoint.clone();
    let a = history_worker(&[&endpoint], &[]).await?;
    let b = history_worker(&[&endpoint], &[&a]).await?;
    let admins = [a.worker.admin_addr, b.worker.admin_addr];
    until_heard(&mut old, "m.warm", &admins).await?;
    let mut clients = vec![a.client(false).await?, b.client(true).await?];
    for c in clients.iter_mut() {
        c.subscribe_history(json!({"op": "subscribe", "topic": "m.1", "last": 0}))
            .await?;
    }
    let mut by_prefix = a.client(false).await?;
    by_prefix
        .send_json(json!({"op": "subscribe", "id": 1, "prefix": "m.1"}))
        .await?;
    assert_eq!(by_prefix.recv_json().await?["type"], "ack");
    clients.push(by_prefix);
    let old_epoch = epoch_hex(old.epoch);
    for n in 0..5 {
        old.publish("m.1", format!("{{\"old\":{n}}}").as_bytes())
            .await?;
    }
    for c in clients.iter_mut() {
        read_topic(c, "m.1", &old_epoch, 4).await?;
    }

    let old_raw_epoch = old.epoch;
    drop(old);
    let mut new = rebind(&endpoint).await?;
    ensure!(new.epoch != old_raw_epoch, "a new epoch");
    let new_epoch = epoch_hex(new.epoch);
    until_heard(&mut new, "m.warm", &admins).await?;
    for n in 0..3 {
        new.publish("m.1", format!("{{\"new\":{n}}}").as_bytes())
            .await?;
    }
    let expected = vec![
        format!("reset {new_epoch}"),
        format!("{new_epoch}@0"),
        format!("{new_epoch}@1"),
        format!("{new_epoch}@2"),
    ];
    for c in clients.iter_mut() {
        let seen = read_topic(c, "m.1", &new_epoch, 2).await?;
        assert_eq!(outline(&seen), expected, "one reset, then the new epoch");
    }

    for w in [&a, &b] {
        // Offset 1 exists in the new epoch too: it must not be taken for a position in it.
        let mut probe = w.client(false).await?;
        let since = json!({"epoch": old_epoch, "offset": 1});
        let (ack, replayed) = probe
            .subscribe_history(json!({"op": "subscribe", "topic": "m.1", "since": since}))
            .await?;
        assert_eq!(ack["history"]["recovered"], false, "{ack}");
        assert_eq!(ack["history"]["reason"], "epoch_changed", "{ack}");
        assert!(replayed.is_empty(), "nothing replayed: {replayed:?}");
        clients.push(probe);

        let mut probe = w.client(false).await?;
        let since = json!({"epoch": old_epoch, "offset": 4});
        let (ack, replayed) = probe
            .subscribe_history(
                json!({"op": "subscribe", "topic": "m.1", "since": since, "last": 100}),
            )
            .await?;
        assert_eq!(ack["history"]["reason"], "epoch_changed", "{ack}");
        assert_eq!(outline(&replayed), expected[1..], "the new epoch only");
        assert_eq!(ack["history"]["position"]["epoch"], new_epoch.as_str());
        clients.push(probe);
    }

    // A message of the old epoch arrives late (it sat in a queue through the restart).
    let late = Position {
        epoch: old_raw_epoch,
        offset: 5,
    };
    new.publish_at("m.1", late, br#"{"old":5}"#).await?;
    new.publish("m.1", br#"{"new":3}"#).await?;
    for c in clients.iter_mut() {
        let seen = read_topic(c, "m.1", &new_epoch, 3).await?;
        assert_eq!(
            outline(&seen),
            [format!("{new_epoch}@3")],
            "the late old message is never delivered, and no second reset"
        );
    }
    for w in [&a, &b] {
        assert_eq!(
            w.metric("worker_stream_events_total{event=\"stale_epoch\""),
            1.0
        );
        let mut c = w.client(false).await?;
        let since = json!({"epoch": new_epoch, "offset": 1});
        let (ack, replayed) = c
            .subscribe_history(json!({"op": "subscribe", "topic": "m.1", "since": since}))
            .await?;
        assert_eq!(ack["history"]["recovered"], true, "{ack}");
        assert_eq!(
            outline(&replayed),
            [format!("{new_epoch}@2"), format!("{new_epoch}@3")]
        );
    }
    Ok(())
}

/// Two publishers carry one stream (redundancy); worker B hears both, worker A only the first.
/// The new epoch reaches B first, and B, filling its new history from its peer A, finds A
/// still on the old epoch: nothing of the old epoch may come back with that fill. Then A hears
/// the new epoch too and resets on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_hearing_the_new_epoch_first_never_fills_from_a_peer_s_old_epoch() -> Result<()> {
    let mut p1 = Publisher::bind().await?;
    let mut p2 = Publisher::bind().await?;
    let a = history_worker(&[&p1.endpoint], &[]).await?;
    let b = history_worker(&[&p1.endpoint, &p2.endpoint], &[&a]).await?;
    until_heard(
        &mut p1,
        "m.warm1",
        &[a.worker.admin_addr, b.worker.admin_addr],
    )
    .await?;
    until_heard(&mut p2, "m.warm2", &[b.worker.admin_addr]).await?;
    let mut on_a = a.client(false).await?;
    let mut on_b = b.client(false).await?;
    for c in [&mut on_a, &mut on_b] {
        c.subscribe_history(json!({"op": "subscribe", "topic": "m.1", "last": 0}))
            .await?;
    }
    let old = p1.epoch;
    let new = old ^ 0x5a5a_5a5a_5a5a_5a5a;
    let at = |epoch, offset| Position { epoch, offset };
    for o in 0..5 {
        let payload = format!("{{\"old\":{o}}}");
        p1.publish_at("m.1", at(old, o), payload.as_bytes()).await?;
        p2.publish_at("m.1", at(old, o), payload.as_bytes()).await?;
    }
    let (old_hex, new_hex) = (epoch_hex(old), epoch_hex(new));
    for c in [&mut on_a, &mut on_b] {
        let seen = read_topic(c, "m.1", &old_hex, 4).await?;
        let want: Vec<String> = (0..5).map(|o| format!("{old_hex}@{o}")).collect();
        assert_eq!(outline(&seen), want, "each once, duplicates dropped");
    }

    p2.publish_at("m.1", at(new, 0), br#"{"new":0}"#).await?;
    let seen = read_topic(&mut on_b, "m.1", &new_hex, 0).await?;
    assert_eq!(
        outline(&seen),
        [format!("reset {new_hex}"), format!("{new_hex}@0")]
    );
    let mut probe = b.client(false).await?;
    let since = json!({"epoch": old_hex, "offset": 4});
    let (ack, replayed) = probe
        .subscribe_history(json!({"op": "subscribe", "topic": "m.1", "since": since, "last": 100}))
        .await?;
    assert_eq!(ack["history"]["reason"], "epoch_changed", "{ack}");
    assert_eq!(
        outline(&replayed),
        [format!("{new_hex}@0")],
        "no old message"
    );

    for p in [&mut p1, &mut p2] {
        p.publish_at("m.1", at(new, 0), br#"{"new":0}"#).await?;
        p.publish_at("m.1", at(new, 1), br#"{"new":1}"#).await?;
    }
    let seen = read_topic(&mut on_a, "m.1", &new_hex, 1).await?;
    assert_eq!(
        outline(&seen),
        [
            format!("reset {new_hex}"),
            format!("{new_hex}@0"),
            format!("{new_hex}@1")
        ]
    );
    for c in [&mut on_b, &mut probe] {
        let seen = read_topic(c, "m.1", &new_hex, 1).await?;
        assert_eq!(outline(&seen), [format!("{new_hex}@1")]);
    }
    eprintln!(
        "worker b fetched from its peer {} times",
        b.metric("worker_peer_fetches_total")
    );
    Ok(())
}

/// A worker keeping history of `m.*`, subscribed to `publishers`, fetching from `peers`.
async fn history_worker(publishers: &[&str], peers: &[&TestWorker]) -> Result<TestWorker> {
    TestWorker::start(|c| {
        c.publishers = publishers.iter().map(ToString::to_string).collect();
        c.history = vec!["m.*,messages=1000".parse().expect("valid rule")];
        c.peers = peers
            .iter()
            .map(|w| w.worker.admin_addr.to_string())
            .collect();
        c.repair_timeout = Duration::from_secs(2);
    })
    .await
}

/// A new publisher bound to `endpoint` once the old one's port is free again (bounded).
async fn rebind(endpoint: &str) -> Result<Publisher> {
    let deadline = Instant::now() + WAIT;
    loop {
        match Publisher::bind_to(endpoint).await {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() < deadline => {
                eprintln!("rebinding {endpoint}: {e}; again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("the restarted publisher cannot bind"),
        }
    }
}

/// What arrived about `topic`, messages and notices in order, up to the message at
/// `epoch`/`offset`.
async fn read_topic(c: &mut WsClient, topic: &str, epoch: &str, offset: u64) -> Result<Vec<Value>> {
    let mut seen = Vec::new();
    for _ in 0..10_000 {
        let m = c.recv_json().await.with_context(|| {
            format!("waiting for {epoch}@{offset}; so far {:?}", outline(&seen))
        })?;
        if m["topic"] != topic {
            continue;
        }
        let done = m["type"] == "message"
            && m["position"]["epoch"] == epoch
            && m["position"]["offset"] == offset;
        seen.push(m);
        if done {
            return Ok(seen);
        }
    }
    bail!("{epoch}@{offset} never came: {:?}", outline(&seen))
}

/// `EPOCH@OFFSET` for messages, `reset EPOCH` for resets, the whole JSON for anything else.
fn outline(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|m| match m["type"].as_str() {
            Some("message") => format!(
                "{}@{}",
                m["position"]["epoch"].as_str().unwrap_or("-"),
                m["position"]["offset"]
            ),
            Some("reset") => format!("reset {}", m["epoch"].as_str().unwrap_or("-")),
            _ => m.to_string(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 4. Slow consumers.
// ---------------------------------------------------------------------------------------------

/// Three clients stop reading (one plain, one compressed, one subscribed by prefix) while six
/// others keep up, all on one topic of large messages. Each slow one is closed with 4001 once
/// its queue passes the cap (one refused delivery each, counted), and what it got before the
/// close is the stream from its start with nothing skipped. The six others get every message,
/// once and in order, before, during and after the closes, and none of them is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_are_closed_with_4001_and_everyone_else_gets_every_message() -> Result<()> {
    const SLOW: usize = 3;
    const FAST: usize = 6;
    const QUEUE: usize = 64 * 1024;
    let mut p = Publisher::bind().await?;
    let w = TestWorker::start(|c| {
        c.publishers = vec![p.endpoint.clone()];
        c.history = vec!["t.*,messages=10".parse().expect("valid rule")];
        c.outbound_queue_bytes = QUEUE;
        // Time for a slow client to read what was in flight, then its close frame: the first
        // slow client overflows well before the last, and they are read only after that.
        c.close_timeout = Duration::from_secs(60);
    })
    .await?;
    until_heard(&mut p, "t.warm", &[w.worker.admin_addr]).await?;
    let subscribe = |i: usize| match i % 3 {
        2 => json!({"op": "subscribe", "id": 1, "prefix": "t."}),
        _ => json!({"op": "subscribe", "id": 1, "topic": "t.1"}),
    };
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let mut c = w.client(i % 3 == 1).await?;
        c.send_json(subscribe(i)).await?;
        assert_eq!(c.recv_json().await?["type"], "ack");
        slow.push(c);
    }
    let progress: Vec<Arc<AtomicU64>> = (0..FAST).map(|_| Arc::default()).collect();
    let mut fast = JoinSet::new();
    for (i, read) in progress.iter().enumerate() {
        let mut c = w.client(i % 2 == 1).await?;
        c.send_json(subscribe(i)).await?;
        assert_eq!(c.recv_json().await?["type"], "ack");
        fast.spawn(keep_up(c, read.clone()));
    }

    // Large messages that do not compress much, so compressed and plain queues fill alike.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let noise: String = (0..4000)
        .map(|_| {
            // xorshift64: letters with no pattern for deflate to find
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect();
    let payload = json!({ "blob": noise }).to_string();
    let closed = || w.metric("worker_slow_client_closes_total");
    // Publish no faster than the fast clients read (at most 5 messages, 20 KB, ahead of the
    // slowest): however busy the machine, they must never be the slow ones.
    let caught_up = |sent: u64| {
        let progress = &progress;
        async move {
            eventually(WAIT, "fast clients keep up", || async {
                progress.iter().all(|r| r.load(Ordering::Relaxed) >= sent)
            })
            .await
        }
    };
    let mut sent = 0u64;
    let mut first_closed = None;
    while closed() < SLOW as f64 {
        if first_closed.is_none() && closed() > 0.0 {
            first_closed = Some(sent);
        }
        ensure!(
            sent < 20_000,
            "slow clients still open after {sent} messages"
        );
        p.publish("t.1", payload.as_bytes()).await?;
        sent += 1;
        if sent.is_multiple_of(5) {
            caught_up(sent).await?;
        }
    }
    let closed_at = sent;
    // Delivery goes on after the closes.
    for _ in 0..20 {
        p.publish("t.1", payload.as_bytes()).await?;
        sent += 1;
        if sent.is_multiple_of(5) {
            caught_up(sent).await?;
        }
    }
    let end = p.publish("t.1", br#"{"end":true}"#).await?.offset;
    let mut readers = JoinSet::new();
    for (i, mut c) in slow.into_iter().enumerate() {
        readers.spawn(async move {
            let read = read_to_close(&mut c, "t.1").await;
            (i, read.with_context(|| format!("slow client {i}")))
        });
    }
    while let Some(joined) = readers.join_next().await {
        let (i, read) = joined?;
        let (offsets, code) = read?;
        assert_eq!(code, close::SLOW_CONSUMER, "slow client {i}");
        ensure!(
            offsets.iter().copied().eq(0..offsets.len() as u64),
            "slow client {i} got a run from offset 0 with nothing skipped: {} offsets, first \
             hole near {:?}",
            offsets.len(),
            offsets.windows(2).find(|p| p[1] != p[0] + 1)
        );
    }
    let mut received = Vec::new();
    while let Some(joined) = tokio::time::timeout(WAIT, fast.join_next())
        .await
        .context("fast clients did not finish")?
    {
        let offsets = joined??;
        ensure!(
            offsets.iter().copied().eq(0..=end),
            "a fast client got {} offsets, not 0..={end} each once in order",
            offsets.len()
        );
        received.push(offsets.len());
    }
    assert_eq!(received.len(), FAST);
    assert_eq!(
        w.metric("worker_dropped_deliveries_total{reason=\"slow_consumer\""),
        SLOW as f64,
        "one delivery refused per slow client: the one that passed its cap"
    );
    eventually(WAIT, "only the slow clients were closed", || async {
        w.metric("worker_connections_closed_total{code=\"4001\"") == SLOW as f64
    })
    .await?;
    eprintln!(
        "slow clients closed after {first_closed:?} to {closed_at} messages of {} bytes",
        payload.len()
    );
    Ok(())
}

/// Reads every message (publishing waits on `read`), up to one with `"end": true`; returns the
/// offsets.
async fn keep_up(mut c: WsClient, read: Arc<AtomicU64>) -> Result<Vec<u64>> {
    let mut offsets = Vec::new();
    loop {
        let m = c.recv_json().await?;
        ensure!(m["type"] == "message", "a fast client got {m}");
        offsets.push(m["position"]["offset"].as_u64().context("offset")?);
        read.store(offsets.len() as u64, Ordering::Relaxed);
        if m["payload"]["end"] == true {
            return Ok(offsets);
        }
    }
}

/// Reads until the close frame: the offsets of `topic` messages received before it, and the
/// close code.
async fn read_to_close(c: &mut WsClient, topic: &str) -> Result<(Vec<u64>, u16)> {
    let mut offsets = Vec::new();
    loop {
        let f = c
            .recv_frame()
            .await
            .with_context(|| format!("no close frame after {} messages", offsets.len()))?;
        match f.opcode {
            8 => return Ok((offsets, f.close_code().context("a close code")?)),
            1 => {
                let m: Value = serde_json::from_slice(&f.payload)?;
                if m["type"] == "message" && m["topic"] == topic {
                    offsets.push(m["position"]["offset"].as_u64().context("offset")?);
                }
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. SIGTERM drain of thousands of clients.
// ---------------------------------------------------------------------------------------------

/// 2,000 clients on worker A follow four topics; A gets SIGTERM mid-stream, with
/// `drain_rate` 1,000/s in batches of 100. Every client is closed with 1012 once, reconnects
/// to worker B and resumes there, `recovered`, with every offset once and in order. The closes
/// keep the rate: by any moment `t` after SIGTERM no more than the batches due by `t` have
/// arrived, so the last comes no sooner than the drain's planned length (19 intervals of
/// 100 ms). Clients and both workers live in this process: about 4,000 sockets at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_two_thousand_clients_at_the_drain_rate_and_all_resume_elsewhere(
) -> Result<()> {
    const CLIENTS: usize = 2000;
    const TOPICS: usize = 4;
    const MESSAGES: u64 = 40;
    const DRAIN_AT: u64 = 8;
    const ROUND: Duration = Duration::from_millis(100);
    const RATE: u32 = 1000;
    const BATCH: u32 = 100;
    let _heavy = HEAVY.lock().await;
    let mut p = Publisher::bind().await?;
    let start = |id: &'static str| {
        let endpoint = p.endpoint.clone();
        TestWorker::start(move |c| {
            c.id = Some(id.into());
            c.publishers = vec![endpoint];
            c.history = vec!["m.*,messages=1000".parse().expect("valid rule")];
            c.drain_rate = RATE;
            c.drain_batch = BATCH;
        })
    };
    let a = start("a").await?;
    let b = start("b").await?;
    until_heard(
        &mut p,
        "m.warm",
        &[a.worker.admin_addr, b.worker.admin_addr],
    )
    .await?;
    let epoch = epoch_hex(p.epoch);
    let (mut clients, placed) = start_followers(CLIENTS, |i| {
        Follower::new(
            i,
            topic(i % TOPICS),
            &epoch,
            MESSAGES - 1,
            vec![a.addr(), b.addr()],
        )
    })
    .await?;
    assert_eq!(count_by_worker(&placed).get("a"), Some(&CLIENTS));

    let mut tick = tokio::time::interval(ROUND);
    let mut sigterm = None;
    for offset in 0..MESSAGES {
        tick.tick().await;
        if offset == DRAIN_AT {
            sigterm = Some(Instant::now());
            a.shutdown.cancel();
        }
        publish_round(&mut p, TOPICS, offset).await?;
    }
    let sigterm = sigterm.context("SIGTERM sent")?;
    let logs = join_followers(&mut clients, Duration::from_secs(90)).await?;

    let mut closes = Vec::with_capacity(CLIENTS);
    for log in &logs {
        log.check()?;
        let who = log.who();
        ensure!(log.workers == ["a", "b"], "{who}: from a to b");
        ensure!(
            log.losses.len() == 1 && log.losses[0].code == Some(close::SERVICE_RESTART),
            "{who}: one close with 1012: {:?}",
            log.losses
        );
        ensure!(log.resumes.len() == 1, "{who}: one resume");
        closes.push(log.losses[0].at.saturating_duration_since(sigterm));
    }
    closes.sort();
    let interval = Duration::from_secs_f64(f64::from(BATCH) / f64::from(RATE));
    for (k, at) in closes.iter().enumerate() {
        let due = (at.as_nanos() / interval.as_nanos()) as usize + 1;
        let allowed = due * BATCH as usize;
        ensure!(
            k < allowed,
            "{} clients closed within {at:?} of SIGTERM: {RATE}/s in batches of {BATCH} allows \
             {allowed}",
            k + 1
        );
    }
    let planned = interval * (CLIENTS.div_ceil(BATCH as usize) - 1) as u32;
    let spread = *closes.last().context("closes")?;
    ensure!(
        spread >= planned,
        "the last close came {spread:?} after SIGTERM, before the planned {planned:?}"
    );
    assert_eq!(
        a.metric("worker_connections_closed_total{code=\"1012\""),
        CLIENTS as f64
    );
    eprintln!(
        "{CLIENTS} clients drained over {spread:.2?} (planned {planned:?}), all resumed on b"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A client that follows one topic across connections (faults 1 and 5).
// ---------------------------------------------------------------------------------------------

/// Connections one follower may open in all.
const MAX_SESSIONS: usize = 4;
/// Connection attempts per (re)connect.
const CONNECT_ATTEMPTS: u32 = 20;
/// Longest a subscribed follower waits for its next frame.
const STALL: Duration = Duration::from_secs(30);
/// `last` on every subscribe: more than a topic ever holds here, so a fresh start gets it all.
const LAST: u64 = 1000;

/// One connection lost.
#[derive(Debug)]
struct Loss {
    worker: String,
    /// The close code, when the worker sent a close frame.
    code: Option<u16>,
    at: Instant,
    why: String,
}

/// A client of one topic that subscribes with `last`, reconnects after any loss (full-jitter
/// backoff, like the reference client), resumes with `since` its last position, and records
/// everything it saw. Session `i` dials `targets[min(i, len - 1)]`: one proxy, or a worker and
/// then the worker to go to next.
struct Follower {
    index: usize,
    topic: String,
    epoch: String,
    /// The last offset published: the follower is done once it has it.
    last: u64,
    targets: Vec<SocketAddr>,
    workers: Vec<String>,
    offsets: Vec<u64>,
    position: Option<Value>,
    resumes: Vec<Value>,
    losses: Vec<Loss>,
    refusals: Vec<String>,
    /// Everything else it was sent: gap, reset, a message of another epoch, ...
    notices: Vec<Value>,
}

impl Follower {
    fn new(index: usize, topic: String, epoch: &str, last: u64, targets: Vec<SocketAddr>) -> Self {
        Follower {
            index,
            topic,
            epoch: epoch.to_string(),
            last,
            targets,
            workers: Vec::new(),
            offsets: Vec::new(),
            position: None,
            resumes: Vec::new(),
            losses: Vec::new(),
            refusals: Vec::new(),
            notices: Vec::new(),
        }
    }

    fn who(&self) -> String {
        format!(
            "client {} on {} via {:?}",
            self.index, self.topic, self.workers
        )
    }

    async fn run(mut self, subscribed: mpsc::Sender<(usize, String)>) -> Result<Follower> {
        let mut subscribed = Some(subscribed);
        for session in 0..MAX_SESSIONS {
            let target = self.targets[session.min(self.targets.len() - 1)];
            let mut c = self.connect(target, session > 0).await?;
            let worker = self.workers.last().cloned().unwrap_or_default();
            let lost = self
                .session(&mut c, &mut subscribed)
                .await
                .with_context(|| self.who())?;
            match lost {
                None => return Ok(self),
                Some((code, at, why)) => self.losses.push(Loss {
                    worker,
                    code,
                    at,
                    why,
                }),
            }
        }
        bail!(
            "{}: {MAX_SESSIONS} connections were not enough: {:?}",
            self.who(),
            self.losses
        )
    }

    /// Connects and reads the welcome, retrying with full-jitter exponential backoff; a
    /// reconnect waits a first random delay too, as the reference client does.
    async fn connect(&mut self, target: SocketAddr, reconnect: bool) -> Result<WsClient> {
        for attempt in 0..CONNECT_ATTEMPTS {
            if reconnect || attempt > 0 {
                let cap_ms = (100u64 << attempt.min(4)).min(1000);
                let wait = Duration::from_millis(rand::random_range(0..cap_ms));
                tokio::time::sleep(wait).await;
            }
            let once = async {
                let mut c =
                    WsClient::connect(target, "/ws", self.index.is_multiple_of(4), &[]).await?;
                let welcome = c.recv_json().await?;
                let worker = welcome["worker"]
                    .as_str()
                    .with_context(|| format!("a welcome naming its worker: {welcome}"))?
                    .to_string();
                anyhow::Ok((c, worker))
            };
            match once.await {
                Ok((c, worker)) => {
                    self.workers.push(worker);
                    return Ok(c);
                }
                Err(e) => self.refusals.push(format!("{e:#}")),
            }
        }
        bail!("{}: no connection: {:?}", self.who(), self.refusals)
    }

    /// Subscribes (resuming when it has a position) and reads to the last offset (`None`) or
    /// until the connection is lost (its close code, when and why). A stall is an error.
    async fn session(
        &mut self,
        c: &mut WsClient,
        subscribed: &mut Option<mpsc::Sender<(usize, String)>>,
    ) -> Result<Option<(Option<u16>, Instant, String)>> {
        let mut request = json!({"op": "subscribe", "id": 1, "topic": self.topic, "last": LAST});
        if let Some(position) = &self.position {
            request["since"] = position.clone();
        }
        if let Err(e) = c.send_json(request).await {
            return Ok(Some((None, Instant::now(), format!("{e:#}"))));
        }
        // The timeout below tells a stall (an error) from a lost connection (a reconnect).
        c.read_timeout = STALL * 2;
        let mut acked = false;
        loop {
            let f = match tokio::time::timeout(STALL, c.recv_frame()).await {
                Err(_) => bail!(
                    "no frame within {STALL:?} (acked {acked}, last offset {:?})",
                    self.offsets.last()
                ),
                Ok(Err(e)) => return Ok(Some((None, Instant::now(), format!("{e:#}")))),
                Ok(Ok(f)) => f,
            };
            match f.opcode {
                1 => {}
                8 => {
                    let at = Instant::now();
                    let _ = c
                        .send_frame(0x88, &f.payload[..f.payload.len().min(2)])
                        .await;
                    return Ok(Some((f.close_code(), at, "close frame".into())));
                }
                9 => {
                    let _ = c.send_frame(0x8A, &f.payload).await;
                    continue;
                }
                _ => continue,
            }
            let m: Value = serde_json::from_slice(&f.payload)?;
            let ours = m["topic"] == self.topic.as_str();
            match m["type"].as_str() {
                Some("ack") if ours && !acked => {
                    acked = true;
                    if self.position.is_some() {
                        self.resumes.push(m["history"].clone());
                    }
                    if let Some(tx) = subscribed.take() {
                        tx.send((self.index, self.workers[0].clone())).await.ok();
                    }
                }
                Some("message") if ours && acked && m["position"]["epoch"] == self.epoch => {
                    let offset = m["position"]["offset"].as_u64().context("offset")?;
                    self.offsets.push(offset);
                    self.position = Some(m["position"].clone());
                    if offset == self.last {
                        return Ok(None);
                    }
                }
                Some("error") => bail!("the worker answered with an error: {m}"),
                _ => self.notices.push(m),
            }
        }
    }

    /// Every offset from 0 to the last, once and in order; nothing else sent; every resume
    /// recovered; every connection attempt accepted.
    fn check(&self) -> Result<()> {
        let who = self.who();
        if let Some(i) = (0..)
            .zip(&self.offsets)
            .position(|(want, got)| *got != want)
        {
            bail!(
                "{who}: offset {} where {i} was due (after {:?})",
                self.offsets[i],
                &self.offsets[i.saturating_sub(3)..i]
            );
        }
        ensure!(
            self.offsets.len() as u64 == self.last + 1,
            "{who}: {} offsets, {} published",
            self.offsets.len(),
            self.last + 1
        );
        ensure!(self.notices.is_empty(), "{who}: notices {:?}", self.notices);
        for history in &self.resumes {
            ensure!(
                history["recovered"] == true,
                "{who}: not recovered: {history}"
            );
        }
        ensure!(
            self.refusals.is_empty(),
            "{who}: refused {:?}",
            self.refusals
        );
        Ok(())
    }
}

/// Starts `n` followers; returns them once every one has its first ack, with the worker each
/// was first placed on.
async fn start_followers(
    n: usize,
    make: impl Fn(usize) -> Follower,
) -> Result<(JoinSet<Result<Follower>>, Vec<(usize, String)>)> {
    let (tx, mut rx) = mpsc::channel(n);
    let mut set = JoinSet::new();
    for i in 0..n {
        set.spawn(make(i).run(tx.clone()));
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut placed = Vec::with_capacity(n);
    while placed.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(p)) => placed.push(p),
            Ok(None) | Err(_) => {
                if let Some(Ok(Err(e))) = set.try_join_next() {
                    return Err(e.context("a client failed before subscribing"));
                }
                bail!("{} of {n} clients subscribed", placed.len());
            }
        }
    }
    Ok((set, placed))
}

/// Waits for every follower (bounded); fails with the first one's error.
async fn join_followers(
    set: &mut JoinSet<Result<Follower>>,
    within: Duration,
) -> Result<Vec<Follower>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut logs = Vec::new();
    while let Some(joined) = tokio::time::timeout_at(deadline, set.join_next())
        .await
        .with_context(|| format!("{} clients finished within {within:?}", logs.len()))?
    {
        logs.push(joined??);
    }
    logs.sort_by_key(|l| l.index);
    Ok(logs)
}

fn count_by_worker(placed: &[(usize, String)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, worker) in placed {
        *counts.entry(worker.clone()).or_default() += 1;
    }
    counts
}

fn topic(i: usize) -> String {
    format!("m.{i}")
}

fn epoch_hex(epoch: u64) -> String {
    Position { epoch, offset: 0 }.epoch_hex().to_string()
}

/// Publishes the message at `offset` on each of `topics` topics.
async fn publish_round(p: &mut Publisher, topics: usize, offset: u64) -> Result<()> {
    for t in 0..topics {
        let payload = format!("{{\"topic\":{t},\"n\":{offset}}}");
        let position = p.publish(&topic(t), payload.as_bytes()).await?;
        ensure!(
            position.offset == offset,
            "stamped {position:?}, not {offset}"
        );
    }
    Ok(())
}

/// Publishes on `warm` (a topic the workers keep history of, so they subscribe to it) until
/// every worker behind `admins` has received more from `p`'s endpoint than when this began
/// (ZeroMQ's slow joiner; a restarted publisher).
async fn until_heard(p: &mut Publisher, warm: &str, admins: &[SocketAddr]) -> Result<()> {
    let name = format!(
        "worker_upstream_messages_total{{endpoint=\"{}\"",
        p.endpoint
    );
    let mut before = Vec::new();
    for admin in admins {
        let (_, metrics) = http_request(*admin, "GET", "/metrics").await?;
        before.push(metric_value(&metrics, &name));
    }
    let deadline = Instant::now() + WAIT;
    loop {
        p.publish(warm, b"{}").await?;
        let mut heard = 0;
        for (admin, before) in admins.iter().zip(&before) {
            let (_, metrics) = http_request(*admin, "GET", "/metrics").await?;
            if metric_value(&metrics, &name) > *before {
                heard += 1;
            }
        }
        if heard == admins.len() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{heard} of {} workers heard {}",
            admins.len(),
            p.endpoint
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Bad input.
// ---------------------------------------------------------------------------------------------

/// What a broken client sends after the welcome.
enum Send {
    /// One masked frame: first header byte (FIN/RSV/opcode) and payload.
    Frame(u8, Vec<u8>),
    /// Bytes as they are.
    Raw(Vec<u8>),
}

/// Connects to `addr` (a worker, or a proxy in front of one), sends `what` and returns the
/// close code that comes back.
async fn close_code_after(addr: SocketAddr, deflate: bool, what: &[Send]) -> Result<u16> {
    let mut c = WsClient::connect(addr, "/ws", deflate, &[]).await?;
    ensure!(c.recv_json().await?["type"] == "welcome");
    for s in what {
        // The worker may close before everything is sent: the close code is what counts.
        let sent = match s {
            Send::Frame(b0, payload) => c.send_frame(*b0, payload).await,
            Send::Raw(bytes) => c.send_raw(bytes).await,
        };
        if sent.is_err() {
            break;
        }
    }
    c.expect_close().await
}

/// A frame header announcing `len` payload bytes (64-bit length, masked), and no payload.
fn header_only(b0: u8, len: u64) -> Vec<u8> {
    let mut h = vec![b0, 0x80 | 127];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[1, 2, 3, 4]);
    h
}

/// The frames no earlier test sent, each with its close code, straight to the worker and
/// through the proxy (which relays them as they are, and the worker's close back).
#[tokio::test]
async fn broken_frames_get_their_close_code_directly_and_through_the_proxy() -> Result<()> {
    let w = TestWorker::start(|c| {
        c.max_frame_bytes = 1000;
        c.max_message_bytes = 1500;
        c.max_decompressed_bytes = 10_000;
    })
    .await?;
    let p = TestProxy::start(&[w.addr()], |_| {}).await?;
    let deflated = |bytes: &[u8]| worker::ws::deflate::deflate(bytes, 6, 15);
    let cases: Vec<(&str, bool, Vec<Send>, u16)> = vec![
        (
            "a header announcing 2^62 bytes (answered before any payload)",
            false,
            vec![Send::Raw(header_only(0x81, 1 << 62))],
            close::MESSAGE_TOO_BIG,
        ),
        (
            "a message over max_message_bytes in small fragments",
            false,
            std::iter::once(Send::Frame(0x01, vec![b' '; 100]))
                .chain((0..20).map(|_| Send::Frame(0x00, vec![b' '; 100])))
                .collect(),
            close::MESSAGE_TOO_BIG,
        ),
        (
            "a compressed frame over max_frame_bytes",
            true,
            vec![Send::Frame(0xC1, vec![0; 1001])],
            close::MESSAGE_TOO_BIG,
        ),
        (
            "an unmasked frame",
            false,
            vec![Send::Raw(vec![0x81, 0x02, b'h', b'i'])],
            close::PROTOCOL_ERROR,
        ),
        (
            "a ping over 125 bytes",
            false,
            vec![Send::Frame(0x89, vec![0; 126])],
            close::PROTOCOL_ERROR,
        ),
        (
            "a close frame with a 1-byte payload",
            false,
            vec![Send::Frame(0x88, vec![3])],
            close::PROTOCOL_ERROR,
        ),
        (
            "a close frame with a reserved code (1005)",
            false,
            vec![Send::Frame(0x88, 1005u16.to_be_bytes().to_vec())],
            close::PROTOCOL_ERROR,
        ),
        (
            "a data frame inside a fragmented message",
            false,
            vec![
                Send::Frame(0x01, b"{".to_vec()),
                Send::Frame(0x81, b"{}".to_vec()),
            ],
            close::PROTOCOL_ERROR,
        ),
        (
            "invalid UTF-8 in a first fragment (refused before the message ends)",
            false,
            vec![Send::Frame(0x01, vec![b'{', 0xC3, 0x28])],
            close::INVALID_UTF8,
        ),
        (
            "a UTF-8 sequence cut off at the end of the message",
            false,
            vec![
                Send::Frame(0x01, b"{\"op\":\"ping\",\"x\":\"".to_vec()),
                Send::Frame(0x80, vec![0xE2, 0x82]),
            ],
            close::INVALID_UTF8,
        ),
        (
            "invalid UTF-8 inside a compressed message",
            true,
            vec![Send::Frame(0xC1, deflated(&[b'{', 0xFF, 0xFE, b'}']))],
            close::INVALID_UTF8,
        ),
        (
            "a close reason that is not UTF-8",
            false,
            vec![Send::Frame(0x88, vec![0x03, 0xE8, 0xFF, 0xFE])],
            close::INVALID_UTF8,
        ),
    ];
    for (what, deflate, frames, expected) in &cases {
        for (via, addr) in [("worker", w.addr()), ("proxy", p.addr())] {
            let code = close_code_after(addr, *deflate, frames)
                .await
                .with_context(|| format!("{what}, via the {via}"))?;
            assert_eq!(code, *expected, "{what}, via the {via}");
        }
    }

    // A valid UTF-8 character split across two fragments is fine, compressed or not.
    for deflate in [false, true] {
        let mut c = w.client(deflate).await?;
        let text = "{\"op\":\"ping\",\"id\":5,\"note\":\"\u{20ac}\"}".as_bytes();
        let cut = text
            .iter()
            .position(|&b| b == 0xE2)
            .context("the euro sign")?
            + 1;
        if deflate {
            let packed = deflated(text);
            let half = packed.len() / 2;
            c.send_frame(0x41, &packed[..half]).await?;
            c.send_frame(0x80, &packed[half..]).await?;
        } else {
            c.send_frame(0x01, &text[..cut]).await?;
            c.send_frame(0x80, &text[cut..]).await?;
        }
        assert_eq!(c.recv_json().await?, json!({"type": "pong", "id": 5}));
    }
    eventually(WAIT, "every broken connection closed", || async {
        w.metric("worker_connections") == 0.0
    })
    .await
}

/// A compressed message of 1 MiB on the wire that inflates to 1 GiB, sent in fragments to a
/// worker allowing 1 MiB inflated: closed with 1009, directly and through the proxy, and the
/// process's peak memory grows by far less than the bomb (the worker stops inflating at the
/// limit instead of after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflate_bomb_is_closed_with_1009_before_it_costs_memory() -> Result<()> {
    const INFLATED: usize = 1 << 30;
    const FRAME: usize = 256 * 1024;
    let w = TestWorker::start(|c| {
        c.max_frame_bytes = FRAME;
        c.max_message_bytes = 4 << 20;
        c.max_decompressed_bytes = 1 << 20;
    })
    .await?;
    let p = TestProxy::start(&[w.addr()], |_| {}).await?;
    let bomb = deflate_bomb(INFLATED);
    ensure!(bomb.len() < 2 << 20, "a bomb of {} bytes", bomb.len());
    let mut frames = Vec::new();
    let chunks: Vec<&[u8]> = bomb.chunks(FRAME).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let fin = if i + 1 == chunks.len() { 0x80 } else { 0 };
        let first = if i == 0 { 0x41 } else { 0x00 };
        frames.push(Send::Frame(fin | first, chunk.to_vec()));
    }

    let _heavy = HEAVY.lock().await;
    let reset = reset_peak_rss();
    let before = peak_rss_bytes().context("peak memory readable")?;
    for (via, addr) in [("worker", w.addr()), ("proxy", p.addr())] {
        let code = close_code_after(addr, true, &frames).await?;
        assert_eq!(code, close::MESSAGE_TOO_BIG, "via the {via}");
    }
    let grown = peak_rss_bytes()
        .context("peak memory readable")?
        .saturating_sub(before);
    eprintln!(
        "bomb of {} bytes for {INFLATED}: peak memory grew {} KiB (peak reset: {reset})",
        bomb.len(),
        grown >> 10
    );
    ensure!(
        grown < 128 << 20,
        "peak memory grew {} MiB while a {} MiB bomb was refused",
        grown >> 20,
        INFLATED >> 20
    );
    eventually(
        WAIT,
        "both bomb connections counted closed with 1009",
        || async { w.metric("worker_connections_closed_total{code=\"1009\"") == 2.0 },
    )
    .await
}

/// Raw deflate data (the permessage-deflate form, without the final `00 00 ff ff`) that
/// inflates to `inflated` zero bytes: blocks of 1 MiB of zeros, each closed by a sync flush, so
/// the same compressed block can be repeated.
fn deflate_bomb(inflated: usize) -> Vec<u8> {
    const BLOCK: usize = 1 << 20;
    let block = worker::ws::deflate::deflate(&vec![0; BLOCK], 9, 15);
    let mut bomb = Vec::with_capacity((block.len() + 4) * inflated / BLOCK);
    for _ in 0..inflated / BLOCK {
        bomb.extend_from_slice(&block);
        bomb.extend_from_slice(&[0, 0, 0xff, 0xff]);
    }
    bomb.truncate(bomb.len() - 4);
    bomb
}

/// Resets this process's peak resident memory to its current one (Linux `clear_refs` 5).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// This process's peak resident memory (`VmHWM`), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Requests that are not what they should be, each with its error code (the connection stays
/// open and answers a ping after them); and a connection at its subscription cap.
#[tokio::test]
async fn bad_requests_get_their_error_code_and_the_connection_stays() -> Result<()> {
    let (mut p, w) = TestWorker::with_publisher(|c| {
        c.max_subscriptions = 2;
        c.max_frame_bytes = 1 << 20;
        c.max_message_bytes = 1 << 20;
    })
    .await?;
    let mut c = w.client(false).await?;
    // Nesting far past serde_json's recursion limit, in a field parsed as any JSON value: an
    // error, not a stack overflow that would take the worker down.
    let deep = format!(
        "{{\"op\":\"subscribe\",\"topic\":\"a\",\"since\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let cases = [
        ("[1,2]".to_string(), "bad_json"),
        ("\"subscribe\"".to_string(), "bad_json"),
        ("null".to_string(), "bad_json"),
        ("42".to_string(), "bad_json"),
        ("{\"op\":\"ping\"".to_string(), "bad_json"),
        (
            "{\"op\":\"ping\"} {\"op\":\"ping\"}".to_string(),
            "bad_json",
        ),
        (deep, "bad_json"),
        ("{}".to_string(), "unknown_op"),
        ("{\"op\":\"PING\"}".to_string(), "unknown_op"),
        ("{\"op\":\"\"}".to_string(), "unknown_op"),
        (
            "{\"op\":\"publish\",\"topic\":\"a\",\"payload\":{}}".to_string(),
            "unknown_op",
        ),
    ];
    for (request, code) in &cases {
        c.send_text(request).await?;
        let reply = c.recv_json().await?;
        let what = &request[..request.len().min(60)];
        assert_eq!(reply["type"], "error", "{what}: {reply}");
        assert_eq!(reply["code"], *code, "{what}: {reply}");
        c.send_json(json!({"op": "ping", "id": 1})).await?;
        assert_eq!(c.recv_json().await?["type"], "pong", "open after {what}");
    }
    let reply = {
        c.send_json(json!({"op": "launch", "id": 77})).await?;
        c.recv_json().await?
    };
    assert_eq!(
        (&reply["code"], &reply["id"]),
        (&json!("unknown_op"), &json!(77))
    );

    // At the cap: subscribing again to what is held is acknowledged (idempotent); anything new
    // is refused and never delivered; a slot freed by unsubscribe can be used.
    let mut other = w.client(false).await?;
    other.subscribe("c").await?;
    c.subscribe("a").await?;
    c.subscribe("b").await?;
    c.send_json(json!({"op": "subscribe", "id": 3, "topic": "a"}))
        .await?;
    let again = c.recv_json().await?;
    assert_eq!(
        (&again["type"], &again["id"]),
        (&json!("ack"), &json!(3)),
        "{again}"
    );
    c.send_json(json!({"op": "subscribe", "id": 4, "topic": "c"}))
        .await?;
    let refused = c.recv_json().await?;
    assert_eq!(refused["code"], "too_many_subscriptions", "{refused}");
    p.prime(&mut other, "c").await?;
    p.prime(&mut c, "a").await?;
    let marker = p.publish("a", br#"{"marker":true}"#).await?.offset;
    loop {
        let m = c.recv_json().await?;
        assert_eq!(m["topic"], "a", "only what the connection holds: {m}");
        if m["position"]["offset"] == marker {
            break;
        }
    }
    c.send_json(json!({"op": "unsubscribe", "id": 5, "topic": "b"}))
        .await?;
    assert_eq!(c.recv_json().await?["type"], "ack");
    c.send_json(json!({"op": "subscribe", "id": 6, "topic": "c"}))
        .await?;
    assert_eq!(c.recv_json().await?["type"], "ack");
    Ok(())
}

/// PROTOCOL.md: `bad_request` is "a field is missing or of the wrong type", and "an optional
/// numeric `id` on a request is echoed in its reply". A field of the wrong type must get
/// `bad_request` with the id, not `bad_json` ("the text is not a JSON object").
#[tokio::test]
async fn requests_with_fields_of_the_wrong_type_get_bad_request_with_their_id() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let mut c = w.client(false).await?;
    let cases = [
        json!({"op": "subscribe", "id": 1, "topic": 5}),
        json!({"op": "subscribe", "id": 2, "prefix": ["m."]}),
        json!({"op": "unsubscribe", "id": 3, "topic": {"name": "a"}}),
        json!({"op": 7, "id": 4}),
    ];
    let mut wrong = Vec::new();
    for request in cases {
        c.send_json(request.clone()).await?;
        let reply = c.recv_json().await?;
        let code_ok = reply["code"] == "bad_request"
            || (request["op"].is_number() && reply["code"] == "unknown_op");
        if !(code_ok && reply["id"] == request["id"]) {
            wrong.push(format!("{request} -> {reply}"));
        }
    }
    ensure!(
        wrong.is_empty(),
        "answered against PROTOCOL.md:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

/// Request heads that are not HTTP/1.1 as it should be: the worker and the proxy both answer
/// 400, and the proxy passes none of them on to a worker.
#[tokio::test]
async fn bad_handshake_lines_get_400_from_the_worker_and_the_proxy() -> Result<()> {
    let w = TestWorker::start(|_| {}).await?;
    let p = TestProxy::start(&[w.addr()], |_| {}).await?;
    let upgrade = |line: &str, extra: &str| {
        format!(
            "{line}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    };
    let ok = "GET /ws HTTP/1.1";
    let cases = [
        ("HTTP/1.0", upgrade("GET /ws HTTP/1.0", "")),
        ("no version", upgrade("GET /ws", "")),
        ("a request line of one word", upgrade("GET", "")),
        ("a header line without a colon", upgrade(ok, "X-Broken\r\n")),
        ("a space in a header name", upgrade(ok, "X Bad: 1\r\n")),
        ("a NUL in a header value", upgrade(ok, "X-Nul: a\0b\r\n")),
        (
            "a control character in the path",
            upgrade("GET /w\x01s HTTP/1.1", ""),
        ),
        (
            "a folded header line",
            upgrade(ok, "X-Fold: a\r\n folded\r\n"),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, request) in &cases {
        for (via, addr) in [("worker", w.addr()), ("proxy", p.addr())] {
            let (head, _, _) = raw_upgrade(addr, request).await?;
            let status = head.split(' ').nth(1).unwrap_or("none");
            if status != "400" {
                wrong.push(format!("{what} via the {via}: {:?}", head.lines().next()));
            }
        }
    }
    ensure!(wrong.is_empty(), "not answered 400:\n{}", wrong.join("\n"));
    assert_eq!(
        w.metric("worker_connections_accepted_total"),
        0.0,
        "none reached the worker through the proxy"
    );
    assert_eq!(
        p.metric("proxy_refused_total{reason=\"bad_request\"}"),
        cases.len() as f64
    );
    Ok(())
}

/// Slowloris: connections that send their request head a byte every 50 ms (each read well
/// within any per-read timeout) get 408 once the whole-head deadline passes, while they are
/// still trickling; their slots are freed; a normal client gets through meanwhile. Against
/// the proxy and against a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshakes_get_408_while_still_trickling() -> Result<()> {
    const LORISES: usize = 10;
    let timeout = Duration::from_millis(500);
    let (mut publisher, w) = TestWorker::with_publisher(|c| c.handshake_timeout = timeout).await?;
    let p = TestProxy::start(&[w.addr()], |c| c.handshake_timeout = timeout).await?;
    let mut clients = Vec::new();
    for (via, addr) in [("proxy", p.addr()), ("worker", w.addr())] {
        let mut lorises = JoinSet::new();
        for _ in 0..LORISES {
            lorises.spawn(slowloris(addr));
        }
        let mut c = WsClient::connect(addr, "/ws", false, &[]).await?;
        assert_eq!(c.recv_json().await?["type"], "welcome", "via the {via}");
        c.subscribe("t").await?;
        publisher.prime(&mut c, "t").await?;
        while let Some(joined) = tokio::time::timeout(WAIT, lorises.join_next())
            .await
            .context("slowloris connections still open")?
        {
            let (status, finished) = joined??;
            assert_eq!(status, 408, "via the {via}");
            assert!(
                !finished,
                "via the {via}: answered only after the whole head came"
            );
        }
        clients.push(c);
    }
    assert_eq!(
        p.metric("proxy_refused_total{reason=\"handshake_timeout\"}"),
        LORISES as f64
    );
    eventually(WAIT, "the proxy freed the slowloris slots", || async {
        p.metric("proxy_connections_active") == 1.0
    })
    .await?;
    assert_eq!(
        w.metric("worker_handshake_failures_total{reason=\"timeout\""),
        LORISES as f64
    );
    Ok(())
}

/// Sends an upgrade request a byte every 50 ms (15 s for the whole head) and reads the answer;
/// returns its status and whether the whole head had been sent by then.
async fn slowloris(addr: SocketAddr) -> Result<(u16, bool)> {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(150)
    );
    let stream = TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = stream.into_split();
    let finished = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let finished = finished.clone();
        async move {
            for b in request.bytes() {
                if wr.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            finished.store(true, Ordering::Relaxed);
        }
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut buf).await? {
                0 => break,
                n => answer.extend_from_slice(&buf[..n]),
            }
        }
        anyhow::Ok(())
    })
    .await;
    let was_finished = finished.load(Ordering::Relaxed);
    writer.abort();
    read.context("no answer to a slowloris")??;
    let head = String::from_utf8_lossy(&answer);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, was_finished))
}
