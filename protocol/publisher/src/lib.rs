//! A pushfleet publisher: stamps each message with its position, sends position checks for
//! quiet topics, and publishes over ZeroMQ PUB to the workers. A library, and the
//! `pushfleet-publish` command built on it.
//!
//! ```text
//!  stdin lines (input) ──┐
//!  generator (pace)    ──┼─▶ Publisher ──[topic, meta, payload]──▶ PUB ──▶ workers (SUB)
//!  your code           ──┘      │  ▲                                ▲
//!                      Stamper: │  │ position per topic              │
//!                      (epoch, offset, quiet topics) ──[topic, check, empty]
//! ```
//!
//! The wire format is specified in protocol/PROTOCOL.md, section 1 (and implemented in
//! `protocol::publish`). Positions follow the product contract: every stamped message of a
//! topic has a position `(epoch, offset)`; the offset grows by exactly one per message of the
//! topic from 0; the epoch (a random u64 by default) names one unbroken stream, so a restarted
//! publisher starts a new one. One writer per topic. A **position check** carries the
//! position of the last message published on a topic; it is sent when the topic has been
//! quiet for the check interval (1 s by default) and again every interval while it stays
//! quiet, so a worker that lost the last message of a quiet topic notices and repairs it.
//!
//! Modules, in the order data meets them:
//! - [`config`]: the command's flags (`pushfleet-publish --help`).
//! - [`input`]: stdin lines, `TOPIC<TAB>PAYLOAD`, bounded and numbered.
//! - [`pace`]: how many generated messages are due at a steady rate.
//! - [`stamp`]: [`Stamper`], positions and due checks; pure logic, `now` passed in.
//! - [`publisher`]: [`Publisher`], the ZeroMQ PUB socket that stamps, checks and sends.
//! - [`mod@run`]: the command's life, from binding to the final round of checks.
//!
//! # Library
//!
//! ```no_run
//! use publisher::{Options, Publisher};
//! use std::time::{Duration, Instant};
//!
//! # async fn example() -> Result<(), publisher::PublishError> {
//! let mut publisher = Publisher::new(Options {
//!     check_interval: Some(Duration::from_secs(1)),
//!     ..Options::default() // random epoch, publish time stamped, topics up to 256 bytes
//! });
//! publisher.bind("tcp://0.0.0.0:5556").await?;
//! let position = publisher.publish("match.1", r#"{"goal":1}"#).await?; // [topic, meta, payload]
//! assert_eq!(position.offset, 0);
//! publisher.publish_live("match.1", "hello").await?; // [topic, payload]: no position
//! // Call regularly (every 100 ms is plenty) so quiet topics get their checks:
//! publisher.send_due_checks(Instant::now()).await?;
//! // Sending only queues: give the last frames time to go out before the socket closes.
//! publisher.send_all_checks().await?;
//! publisher.close(Duration::from_millis(500)).await;
//! # Ok(())
//! # }
//! ```
//!
//! # Command line
//!
//! ```text
//! # 5 generated JSON messages per second on each of two topics, until Ctrl-C:
//! pushfleet-publish --bind tcp://0.0.0.0:5556 --topic match.1 --topic match.2 --rate 5
//!
//! # one message per stdin line, TOPIC<TAB>PAYLOAD; stops at the end of input:
//! printf 'match.1\t{"goal":1}\n' | pushfleet-publish --bind tcp://127.0.0.1:0 --stdin
//!
//! # every line is a payload for one topic; checks every 250 ms, no publish time:
//! tail -f scores.jsonl | pushfleet-publish --connect tcp://proxy:5559 --stdin \
//!     --topic scores --check-interval 250ms --no-time
//! ```
//!
//! Once ready the command prints `bound <endpoint>` per `--bind` (with the real port for
//! `:0`), `connected <endpoint>` per `--connect` and `epoch <16 hex digits>` on stdout; it logs
//! progress and bad input lines (with their number) on stderr. It stops on SIGINT/SIGTERM, at
//! the end of stdin or after `--count` messages per topic, each time after a final round of
//! checks and a short linger (`--linger`) so that queued frames go out.

pub mod config;
pub mod input;
pub mod pace;
pub mod publisher;
pub mod run;
pub mod stamp;

pub use config::Config;
pub use publisher::{now_us, Options, PublishError, Publisher};
pub use run::{run, RunError, Summary};
pub use stamp::Stamper;
