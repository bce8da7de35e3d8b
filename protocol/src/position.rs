//! A message's place in its topic's stream.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where a message stands in its topic: `offset` grows by exactly one per message within one
/// `epoch`; a new epoch starts an unrelated stream (publisher restart, history lost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// Names one unbroken stream of the topic; chosen by the publisher (e.g. random at start).
    pub epoch: u64,
    /// Zero-based index of the message within the epoch.
    pub offset: u64,
}

impl Position {
    /// The epoch as clients see it: 16 lowercase hex digits (a JSON number cannot hold a u64).
    pub fn epoch_hex(&self) -> EpochHex {
        EpochHex(self.epoch)
    }
}

/// Displays an epoch as 16 lowercase hex digits.
#[derive(Debug, Clone, Copy)]
pub struct EpochHex(pub u64);

impl fmt::Display for EpochHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The JSON form of a position: `{"epoch":"00000000000000ff","offset":42}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JsonPosition {
    /// Epoch as 16 hex digits.
    pub epoch: String,
    /// Offset within the epoch.
    pub offset: u64,
}

impl From<Position> for JsonPosition {
    fn from(p: Position) -> Self {
        JsonPosition {
            epoch: p.epoch_hex().to_string(),
            offset: p.offset,
        }
    }
}

/// Reads an epoch written as 1 to 16 hex digits (no sign, no prefix).
pub fn parse_epoch(text: &str) -> Option<u64> {
    let digits_only =
        !text.is_empty() && text.len() <= 16 && text.bytes().all(|b| b.is_ascii_hexdigit());
    digits_only
        .then(|| u64::from_str_radix(text, 16).ok())
        .flatten()
}

/// The epoch of a [`JsonPosition`] is not 1 to 16 hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEpoch;

impl TryFrom<&JsonPosition> for Position {
    type Error = BadEpoch;
    fn try_from(p: &JsonPosition) -> Result<Self, Self::Error> {
        Ok(Position {
            epoch: parse_epoch(&p.epoch).ok_or(BadEpoch)?,
            offset: p.offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_position_round_trips_full_u64_epochs() {
        for epoch in [0, 1, 0xdead_beef, u64::MAX] {
            let p = Position { epoch, offset: 7 };
            let j = JsonPosition::from(p);
            assert_eq!(j.epoch.len(), 16);
            assert_eq!(Position::try_from(&j).unwrap(), p);
        }
    }

    #[test]
    fn epochs_are_only_hex_digits() {
        assert_eq!(parse_epoch("ff"), Some(255));
        assert_eq!(parse_epoch("FFFFFFFFFFFFFFFF"), Some(u64::MAX));
        for bad in ["", "+1", "-1", "0x1", "00000000000000001", " 1", "g"] {
            assert_eq!(parse_epoch(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bad_epoch_text_is_rejected() {
        let j = JsonPosition {
            epoch: "xyz".into(),
            offset: 0,
        };
        assert!(Position::try_from(&j).is_err());
    }
}
