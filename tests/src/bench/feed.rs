//! The upstream feed of a benchmark: an in-process ZeroMQ publisher on its own thread and
//! runtime, so that pacing and timestamps are not delayed behind thousands of client tasks.
//! Each run publishes realistic live-event JSON at a fixed rate, round-robin over its topics.

use crate::Publisher;
use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use std::fmt::Write as _;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The feed: a publisher thread that takes runs ([`PubThread::run`]) one after another.
pub struct PubThread {
    /// The ZeroMQ endpoint workers connect to (`tcp://127.0.0.1:<port>`).
    pub endpoint: String,
    tx: Option<mpsc::UnboundedSender<PubRun>>,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct PubRun {
    topics: Vec<String>,
    rate: f64,
    count: Option<u64>,
    stop: CancellationToken,
    done: oneshot::Sender<Result<RunReport>>,
}

/// What one run published.
#[derive(Debug, Clone, Copy)]
pub struct RunReport {
    /// Messages published, over all topics.
    pub published: u64,
    /// From the run's start to its last publish.
    pub elapsed: Duration,
    /// The most a publish was late against the run's schedule.
    pub max_lag: Duration,
}

impl PubThread {
    /// Binds the publisher on 127.0.0.1 port 0 in a new thread; payloads are JSON of about
    /// `payload_bytes` bytes.
    pub async fn start(payload_bytes: usize) -> Result<PubThread> {
        let (tx, mut rx) = mpsc::unbounded_channel::<PubRun>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<String>>();
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut publisher = match Publisher::bind().await {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(publisher.endpoint.clone()));
                    let mut payloads = PayloadGen::new(payload_bytes);
                    loop {
                        let run = tokio::select! {
                            r = rx.recv() => match r { Some(r) => r, None => return },
                            _ = sd.cancelled() => return,
                        };
                        let stop = run.stop.clone();
                        let result = tokio::select! {
                            r = publish_run(&mut publisher, &mut payloads, &run, &stop) => r,
                            _ = sd.cancelled() => return,
                        };
                        let _ = run.done.send(result);
                    }
                });
            })?;
        let endpoint = ready_rx.await.context("publisher thread died")??;
        Ok(PubThread {
            endpoint,
            tx: Some(tx),
            shutdown,
            thread: Some(thread),
        })
    }

    /// Publishes `count` messages (or until `stop`) at `rate` per second in total, round-robin
    /// over `topics` starting with the first: topic `i` gets messages `i`, `i + len`, ...
    /// Topics count their offsets from 0 across runs.
    pub fn run(
        &self,
        topics: &[String],
        rate: f64,
        count: Option<u64>,
        stop: CancellationToken,
    ) -> oneshot::Receiver<Result<RunReport>> {
        let (done, rx) = oneshot::channel();
        if let Some(tx) = &self.tx {
            let _ = tx.send(PubRun {
                topics: topics.to_vec(),
                rate,
                count,
                stop,
                done,
            });
        }
        rx
    }
}

impl Drop for PubThread {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn publish_run(
    publisher: &mut Publisher,
    payloads: &mut PayloadGen,
    run: &PubRun,
    stop: &CancellationToken,
) -> Result<RunReport> {
    anyhow::ensure!(!run.topics.is_empty(), "a feed run needs a topic");
    let start = tokio::time::Instant::now();
    let mut max_lag = Duration::ZERO;
    let mut k = 0u64;
    while run.count.is_none_or(|c| k < c) && !stop.is_cancelled() {
        let due = start + Duration::from_secs_f64(k as f64 / run.rate);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.cancelled() => break,
        }
        max_lag = max_lag.max(tokio::time::Instant::now().saturating_duration_since(due));
        let payload = payloads.next_payload();
        let topic = &run.topics[(k % run.topics.len() as u64) as usize];
        publisher.publish(topic, payload.as_bytes()).await?;
        k += 1;
    }
    Ok(RunReport {
        published: k,
        elapsed: start.elapsed(),
        max_lag,
    })
}

/// Messages topic `i` of `topics` got from a run that published `published` in total.
pub fn per_topic(published: u64, topics: usize, i: usize) -> u64 {
    let t = topics as u64;
    published / t + u64::from((i as u64) < published % t)
}

/// Realistic live sports-event JSON, about `target` bytes, different in every message (so the
/// compression ratio is what a live feed would get, not that of a repeated string).
pub struct PayloadGen {
    target: usize,
    seq: u64,
    rng: rand::rngs::StdRng,
}

impl PayloadGen {
    /// Payloads of about `target` bytes, the same sequence in every run of the bench.
    pub fn new(target: usize) -> Self {
        PayloadGen {
            target,
            seq: 0,
            rng: rand::rngs::StdRng::seed_from_u64(4711),
        }
    }

    /// The next payload.
    pub fn next_payload(&mut self) -> String {
        const EVENTS: &[&str] = &[
            "shot_on_target",
            "shot_off_target",
            "corner",
            "free_kick",
            "foul",
            "offside",
            "throw_in",
            "goal_kick",
            "yellow_card",
            "substitution",
            "save",
            "possession_change",
        ];
        const PLAYERS: &[(&str, &str, u8, &str)] = &[
            ("p-204", "Vinícius Júnior", 7, "home"),
            ("p-118", "Jude Bellingham", 5, "home"),
            ("p-331", "Kylian Mbappé", 9, "home"),
            ("p-077", "Federico Valverde", 8, "home"),
            ("p-512", "Erling Haaland", 9, "away"),
            ("p-530", "Phil Foden", 47, "away"),
            ("p-545", "Rodri", 16, "away"),
            ("p-561", "Bernardo Silva", 20, "away"),
        ];
        const PHRASES: &[&str] = &[
            "Pressing high up the pitch and forcing the defence back.",
            "A quick one-two on the left flank opens up space in the box.",
            "The keeper comes off his line to claim a dangerous cross.",
            "Patient build-up play from the back, probing for an opening.",
            "The referee waves play on after a coming-together in midfield.",
            "A long diagonal ball switches play to the right wing.",
            "The crowd roars as the home side win a corner.",
            "Tired legs now; both managers are looking at the bench.",
        ];
        self.seq += 1;
        let r = &mut self.rng;
        let seq = self.seq;
        let minute = 1 + (seq / 20) % 95;
        let (pid, pname, number, team) = PLAYERS[r.random_range(0..PLAYERS.len())];
        let event = EVENTS[r.random_range(0..EVENTS.len())];
        let (hs, as_) = ((seq / 700) % 5, (seq / 1100) % 4);
        let poss: u32 = r.random_range(38..63);
        let mut s = String::with_capacity(self.target + 128);
        // The core of the event, always present (~260 B).
        let _ = write!(
            s,
            concat!(
                r#"{{"event_id":"evt-4711-{seq:07}","match":{{"id":4711,"status":"{status}","#,
                r#""minute":{minute},"score":{{"home":{hs},"away":{as_}}}}},"#,
                r#""event":{{"seq":{seq},"type":"{event}","team":"{team}","#,
                r#""player":{{"id":"{pid}","name":"{pname}","number":{number}}},"#,
                r#""x":{x:.1},"y":{y:.1},"xg":{xg:.2}}}"#
            ),
            seq = seq,
            status = if minute <= 45 { "1H" } else { "2H" },
            minute = minute,
            hs = hs,
            as_ = as_,
            event = event,
            team = team,
            pid = pid,
            pname = pname,
            number = number,
            x = r.random_range(0.0..105.0f64),
            y = r.random_range(0.0..68.0f64),
            xg = r.random_range(0.0..0.8f64),
        );
        // Then whatever else fits, most useful first.
        let extras = [
            format!(
                r#","odds":{{"1x2":{{"home":{:.2},"draw":{:.2},"away":{:.2}}},"over_2_5":{:.2}}}"#,
                r.random_range(1.2..3.5f64),
                r.random_range(2.8..5.0f64),
                r.random_range(1.8..9.0f64),
                r.random_range(1.3..2.6f64),
            ),
            format!(
                r#","stats":{{"possession":[{poss},{}],"shots":[{},{}],"corners":[{},{}]}}"#,
                100 - poss,
                seq % 23,
                seq % 17,
                seq % 11,
                seq % 9,
            ),
            concat!(
                r#","teams":{"home":{"id":"t-541","name":"Real Madrid","short":"RMA"},"#,
                r#""away":{"id":"t-50","name":"Manchester City","short":"MCI"}}"#
            )
            .to_string(),
            concat!(
                r#","competition":{"id":"uefa-cl","name":"UEFA Champions League","#,
                r#""season":"2025/26","stage":"Round of 16"}"#
            )
            .to_string(),
        ];
        for extra in extras {
            if s.len() + extra.len() < self.target {
                s.push_str(&extra);
            }
        }
        // Pad with commentary up to the target size.
        let room = self.target.saturating_sub(s.len() + 17);
        if room > 0 {
            let mut text = String::with_capacity(room + 80);
            while text.len() < room {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(PHRASES[r.random_range(0..PHRASES.len())]);
            }
            let mut cut = room.min(text.len());
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            let _ = write!(s, r#","commentary":"{text}""#);
        }
        s.push('}');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_json_near_the_target_size() {
        let mut g = PayloadGen::new(500);
        for _ in 0..100 {
            let p = g.next_payload();
            serde_json::from_str::<serde_json::Value>(&p).unwrap();
            assert!((480..=520).contains(&p.len()), "{}: {p}", p.len());
        }
    }

    #[test]
    fn round_robin_shares_add_up() {
        for topics in 1..5 {
            for published in 0..20 {
                let shares: Vec<u64> = (0..topics)
                    .map(|i| per_topic(published, topics, i))
                    .collect();
                assert_eq!(shares.iter().sum::<u64>(), published);
                assert!(shares.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1));
            }
        }
    }
}
