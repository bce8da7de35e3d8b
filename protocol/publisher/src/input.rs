//! Messages read from a byte stream (the CLI's stdin): one message per line, either
//! `TOPIC<TAB>PAYLOAD` or, when the topic is fixed, the whole line as the payload.
//!
//! Lines are bounded: a longer line is skipped and reported, never buffered whole. A trailing
//! `\r` is dropped with the `\n`, so CRLF input works; a last line without `\n` counts.

use bytes::Bytes;
use protocol::publish::{self, TopicError};
use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Why a line is not a message.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum LineError {
    /// No tab separates the topic from the payload.
    #[error("no tab between topic and payload")]
    NoTab,
    /// The line exceeds the line limit.
    #[error("line is longer than the limit of {limit} bytes (--max-line-bytes)")]
    TooLong {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The topic is not acceptable to workers.
    #[error("invalid topic: {0}")]
    Topic(#[from] TopicError),
}

/// Splits a line into `(topic, payload)`. With `fixed_topic`, the whole line is the payload.
/// The payload shares the line's storage.
pub fn parse_line<'a>(
    line: &'a Bytes,
    fixed_topic: Option<&'a str>,
    max_topic_bytes: usize,
) -> Result<(&'a str, Bytes), LineError> {
    if let Some(topic) = fixed_topic {
        return Ok((topic, line.clone()));
    }
    let tab = line
        .iter()
        .position(|b| *b == b'\t')
        .ok_or(LineError::NoTab)?;
    let topic = publish::validate_topic(&line[..tab], max_topic_bytes)?;
    Ok((topic, line.slice(tab + 1..)))
}

/// Reads lines of at most `max_line_bytes` (without the line end) from `inner`.
pub struct LineReader<R> {
    inner: R,
    max_line_bytes: usize,
    /// The line read so far; kept here (not in a future) so that `next_line` is cancel-safe.
    line: Vec<u8>,
    /// The current line passed the limit: its remaining bytes are discarded.
    too_long: bool,
    /// Number of the last line returned, from 1.
    line_number: u64,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    /// A reader of lines up to `max_line_bytes` long.
    pub fn new(inner: R, max_line_bytes: usize) -> Self {
        LineReader {
            inner,
            max_line_bytes,
            line: Vec::new(),
            too_long: false,
            line_number: 0,
        }
    }

    /// The next line and its number (from 1), `None` at the end of input. Cancel-safe: a
    /// line partly read when the future is dropped is completed by the next call.
    pub async fn next_line(&mut self) -> std::io::Result<Option<(u64, Result<Bytes, LineError>)>> {
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                if self.line.is_empty() && !self.too_long {
                    return Ok(None);
                }
                return Ok(Some(self.finish_line()));
            }
            let newline = available.iter().position(|b| *b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            if !self.too_long {
                if self.line.len() + chunk.len() > self.max_line_bytes + 1 {
                    // +1: a `\r` before the `\n` is not part of the line.
                    self.too_long = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            let consumed = newline.map_or(available.len(), |at| at + 1);
            self.inner.consume(consumed);
            if newline.is_some() {
                return Ok(Some(self.finish_line()));
            }
        }
    }

    fn finish_line(&mut self) -> (u64, Result<Bytes, LineError>) {
        self.line_number += 1;
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let too_long = std::mem::take(&mut self.too_long) || line.len() > self.max_line_bytes;
        let result = if too_long {
            Err(LineError::TooLong {
                limit: self.max_line_bytes,
            })
        } else {
            Ok(Bytes::from(line))
        };
        (self.line_number, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Lines = Vec<(u64, Result<Vec<u8>, LineError>)>;

    async fn read_all(input: &[u8], limit: usize, chunk: usize) -> Lines {
        // A small buffer exercises lines split across reads.
        let reader = tokio::io::BufReader::with_capacity(chunk, input);
        let mut lines = LineReader::new(reader, limit);
        let mut out = Vec::new();
        while let Some((n, line)) = lines.next_line().await.unwrap() {
            out.push((n, line.map(|b| b.to_vec())));
        }
        out
    }

    fn ok(n: u64, s: &str) -> (u64, Result<Vec<u8>, LineError>) {
        (n, Ok(s.as_bytes().to_vec()))
    }

    #[tokio::test]
    async fn lines_are_numbered_and_line_ends_dropped() {
        for chunk in [1, 2, 3, 64] {
            let lines = read_all(b"a\tb\r\n\nlast", 100, chunk).await;
            assert_eq!(lines, [ok(1, "a\tb"), ok(2, ""), ok(3, "last")], "{chunk}");
        }
    }

    #[tokio::test]
    async fn empty_input_has_no_lines() {
        assert!(read_all(b"", 10, 4).await.is_empty());
        assert_eq!(read_all(b"\n", 10, 4).await, [ok(1, "")]);
    }

    #[tokio::test]
    async fn long_lines_are_skipped_and_reading_goes_on() {
        for chunk in [1, 3, 64] {
            let lines = read_all(b"12345\n123456\n1234\r\n123456", 5, chunk).await;
            let too_long = Err(LineError::TooLong { limit: 5 });
            assert_eq!(
                lines,
                [
                    ok(1, "12345"),
                    (2, too_long.clone()),
                    ok(3, "1234"),
                    (4, too_long)
                ],
                "{chunk}"
            );
        }
        // Exactly at the limit with CRLF is fine; one byte more is not.
        assert_eq!(read_all(b"12345\r\n", 5, 2).await, [ok(1, "12345")]);
        assert_eq!(
            read_all(b"123456\r\n", 5, 2).await,
            [(1, Err(LineError::TooLong { limit: 5 }))]
        );
    }

    #[test]
    fn a_line_splits_at_the_first_tab() {
        let line = Bytes::from_static(b"scores\t{\"a\":\"x\ty\"}");
        let (topic, payload) = parse_line(&line, None, 256).unwrap();
        assert_eq!(topic, "scores");
        assert_eq!(&payload[..], b"{\"a\":\"x\ty\"}");
        let line = Bytes::from_static(b"t\t");
        assert_eq!(parse_line(&line, None, 256).unwrap().1.len(), 0);
    }

    #[test]
    fn with_a_fixed_topic_the_whole_line_is_the_payload() {
        let line = Bytes::from_static(b"a\tb");
        let (topic, payload) = parse_line(&line, Some("fixed"), 256).unwrap();
        assert_eq!(topic, "fixed");
        assert_eq!(&payload[..], b"a\tb");
    }

    #[test]
    fn bad_lines_say_why() {
        let parse = |s: &'static [u8]| parse_line(&Bytes::from_static(s), None, 4).map(drop);
        assert_eq!(parse(b"no tab here"), Err(LineError::NoTab));
        assert_eq!(
            parse(b"\tpayload"),
            Err(LineError::Topic(TopicError::Empty))
        );
        assert_eq!(
            parse(b"12345\tp"),
            Err(LineError::Topic(TopicError::TooLong { len: 5, limit: 4 }))
        );
        assert_eq!(
            parse(b"a\x01\tp"),
            Err(LineError::Topic(TopicError::ControlCharacter))
        );
        assert_eq!(
            parse(b"\xff\tp"),
            Err(LineError::Topic(TopicError::NotUtf8))
        );
    }
}
