//! Simulated football matches, one minute at a time: the "key moments" the demo publishes
//! (kick-off, chances, cards, substitutions, goals with the score, half-time, full time).
//! Pure logic: the caller owns the clock and passes nothing but a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Clubs the fixtures are drawn from.
const CLUBS: [&str; 12] = [
    "Lions",
    "Harbour FC",
    "Northgate",
    "Red Valley",
    "Athletic Bay",
    "Old Mill",
    "Riverside",
    "Kingsbridge",
    "Union Park",
    "Eastfield",
    "Sporting Vale",
    "Hillcrest",
];

const INITIALS: [&str; 10] = ["A.", "B.", "C.", "D.", "J.", "K.", "L.", "M.", "N.", "T."];
const SURNAMES: [&str; 16] = [
    "Okafor",
    "Silva",
    "Novak",
    "Haddad",
    "Lindqvist",
    "Moreau",
    "Rossi",
    "Kowalski",
    "Tanaka",
    "Mensah",
    "Byrne",
    "García",
    "Petrov",
    "Jensen",
    "Costa",
    "Adeyemi",
];

/// Chance per simulated minute of each random moment.
const GOAL: f64 = 0.03;
const CHANCE: f64 = 0.12;
const YELLOW_CARD: f64 = 0.045;
const RED_CARD: f64 = 0.003;
const SUBSTITUTION: f64 = 0.07;
/// Substitutions happen in the second half only.
const SUBSTITUTIONS_FROM: u32 = 55;
/// Simulated minutes of the half-time break (no moments).
const HALF_TIME_BREAK: u32 = 3;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    KickOff,
    Chance,
    Goal,
    YellowCard,
    RedCard,
    Substitution,
    HalfTime,
    SecondHalf,
    FullTime,
}

impl Kind {
    /// The `kind` field of the payload.
    pub fn label(self) -> &'static str {
        match self {
            Kind::KickOff => "kick_off",
            Kind::Chance => "chance",
            Kind::Goal => "goal",
            Kind::YellowCard => "yellow_card",
            Kind::RedCard => "red_card",
            Kind::Substitution => "substitution",
            Kind::HalfTime => "half_time",
            Kind::SecondHalf => "second_half",
            Kind::FullTime => "full_time",
        }
    }
}

/// One key moment, ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Moment {
    /// What happened.
    pub kind: Kind,
    /// Match minute.
    pub minute: u32,
    /// The JSON payload clients receive.
    pub payload: Value,
}

/// Where a match is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotStarted,
    FirstHalf,
    Break { left: u32 },
    SecondHalf,
    Over,
}

/// One simulated match.
pub struct Match {
    number: u32,
    home: &'static str,
    away: &'static str,
    minute: u32,
    score: [u32; 2],
    phase: Phase,
    rng: StdRng,
}

impl Match {
    /// Match `number` (its topic is `match.<number>`) of `round`, drawn from `seed`: the same
    /// arguments always play the same match.
    pub fn new(number: u32, round: u64, seed: u64) -> Match {
        let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(number) << 32) ^ round);
        let home = rng.random_range(0..CLUBS.len());
        let away = (home + rng.random_range(1..CLUBS.len())) % CLUBS.len();
        Match {
            number,
            home: CLUBS[home],
            away: CLUBS[away],
            minute: 0,
            score: [0, 0],
            phase: Phase::NotStarted,
            rng,
        }
    }

    /// The teams, home first.
    pub fn teams(&self) -> (&'static str, &'static str) {
        (self.home, self.away)
    }

    /// Whether full time has been played.
    pub fn is_over(&self) -> bool {
        self.phase == Phase::Over
    }

    /// Plays one simulated minute and returns its moments, in order (none once over).
    pub fn play_minute(&mut self) -> Vec<Moment> {
        let mut moments = Vec::new();
        match self.phase {
            Phase::NotStarted => {
                self.phase = Phase::FirstHalf;
                let text = format!("Kick-off: {} v {}", self.home, self.away);
                moments.push(self.moment(Kind::KickOff, None, None, text));
            }
            Phase::FirstHalf | Phase::SecondHalf => {
                self.minute += 1;
                self.random_moments(&mut moments);
                if self.minute == 45 && self.phase == Phase::FirstHalf {
                    self.phase = Phase::Break {
                        left: HALF_TIME_BREAK,
                    };
                    let text = format!("Half-time: {}", self.scoreline());
                    moments.push(self.moment(Kind::HalfTime, None, None, text));
                } else if self.minute == 90 {
                    self.phase = Phase::Over;
                    let text = format!("Full time: {}", self.scoreline());
                    moments.push(self.moment(Kind::FullTime, None, None, text));
                }
            }
            Phase::Break { left } if left > 1 => self.phase = Phase::Break { left: left - 1 },
            Phase::Break { .. } => {
                self.phase = Phase::SecondHalf;
                let text = "Second half under way".to_string();
                moments.push(self.moment(Kind::SecondHalf, None, None, text));
            }
            Phase::Over => {}
        }
        moments
    }

    fn random_moments(&mut self, moments: &mut Vec<Moment>) {
        let side = usize::from(self.rng.random_bool(0.5));
        let team = [self.home, self.away][side];
        let player = self.player();
        if self.rng.random_bool(CHANCE) {
            let text = format!("Chance for {team}: {player} forces a save");
            moments.push(self.moment(Kind::Chance, Some(side), Some(player.clone()), text));
        }
        if self.rng.random_bool(GOAL) {
            self.score[side] += 1;
            let text = format!("GOAL! {player} scores for {team}. {}", self.scoreline());
            moments.push(self.moment(Kind::Goal, Some(side), Some(player.clone()), text));
        }
        if self.rng.random_bool(YELLOW_CARD) {
            let text = format!("Yellow card: {player} ({team})");
            moments.push(self.moment(Kind::YellowCard, Some(side), Some(player.clone()), text));
        }
        if self.rng.random_bool(RED_CARD) {
            let text = format!("Red card! {player} ({team}) is sent off");
            moments.push(self.moment(Kind::RedCard, Some(side), Some(player.clone()), text));
        }
        if self.minute >= SUBSTITUTIONS_FROM && self.rng.random_bool(SUBSTITUTION) {
            let on = self.player();
            let text = format!("Substitution for {team}: {on} replaces {player}");
            moments.push(self.moment(Kind::Substitution, Some(side), Some(on), text));
        }
    }

    fn player(&mut self) -> String {
        let initial = INITIALS[self.rng.random_range(0..INITIALS.len())];
        let surname = SURNAMES[self.rng.random_range(0..SURNAMES.len())];
        format!("{initial} {surname}")
    }

    fn scoreline(&self) -> String {
        format!(
            "{} {}-{} {}",
            self.home, self.score[0], self.score[1], self.away
        )
    }

    fn moment(
        &self,
        kind: Kind,
        side: Option<usize>,
        player: Option<String>,
        text: String,
    ) -> Moment {
        let payload = json!({
            "match": self.number,
            "home": self.home,
            "away": self.away,
            "minute": self.minute,
            "kind": kind.label(),
            "team": side.map(|s| ["home", "away"][s]),
            "player": player,
            "score": self.score,
            "text": text,
        });
        Moment {
            kind,
            minute: self.minute,
            payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn play_out(m: &mut Match) -> Vec<Moment> {
        let mut all = Vec::new();
        for _ in 0..200 {
            all.extend(m.play_minute());
            if m.is_over() {
                return all;
            }
        }
        panic!("a match must end within 200 simulated minutes");
    }

    #[test]
    fn a_match_runs_from_kick_off_to_full_time_in_order() {
        for seed in 0..50 {
            let mut m = Match::new(1, 0, seed);
            let moments = play_out(&mut m);
            assert_eq!(moments.first().unwrap().kind, Kind::KickOff);
            assert_eq!(moments.last().unwrap().kind, Kind::FullTime);
            assert_eq!(moments.last().unwrap().minute, 90);
            let kinds: Vec<Kind> = moments.iter().map(|m| m.kind).collect();
            let half = kinds.iter().position(|k| *k == Kind::HalfTime).unwrap();
            let second = kinds.iter().position(|k| *k == Kind::SecondHalf).unwrap();
            assert!(half < second, "seed {seed}: {kinds:?}");
            assert!(moments.windows(2).all(|w| w[0].minute <= w[1].minute));
            assert!(m.play_minute().is_empty(), "nothing after full time");
        }
    }

    #[test]
    fn the_score_counts_the_goals_and_never_goes_down() {
        for seed in 0..50 {
            let moments = play_out(&mut Match::new(2, 1, seed));
            let mut goals = [0u64, 0];
            for m in &moments {
                let p = &m.payload;
                if m.kind == Kind::Goal {
                    goals[usize::from(p["team"] == "away")] += 1;
                }
                let score = [p["score"][0].as_u64(), p["score"][1].as_u64()];
                assert_eq!(score, [Some(goals[0]), Some(goals[1])], "seed {seed}: {p}");
            }
        }
    }

    #[test]
    fn the_same_seed_plays_the_same_match_and_teams_differ() {
        let a = play_out(&mut Match::new(3, 7, 42));
        let b = play_out(&mut Match::new(3, 7, 42));
        assert_eq!(a, b);
        for round in 0..100 {
            let (home, away) = Match::new(1, round, 9).teams();
            assert_ne!(home, away);
        }
        let payload = &a[0].payload;
        assert_eq!(payload["match"], 3);
        assert_eq!(payload["kind"], "kick_off");
        assert!(payload["text"].as_str().unwrap().contains(" v "));
    }

    #[test]
    fn there_is_something_to_watch() {
        // Over many matches, each random kind shows up: the demo feed is lively.
        let mut seen = std::collections::HashSet::new();
        for seed in 0..40 {
            for m in play_out(&mut Match::new(1, 0, seed)) {
                seen.insert(m.kind.label());
            }
        }
        for kind in ["chance", "goal", "yellow_card", "red_card", "substitution"] {
            assert!(seen.contains(kind), "{kind} never happened: {seen:?}");
        }
    }
}
