//! Who may connect and what they may subscribe to: access tokens (JWT) checked at connect, the
//! topics they grant, and the `Origin` allowlist. Pure logic: keys are loaded once at start,
//! every check takes `now` (Unix seconds), nothing here does I/O.
//!
//! ```text
//!  upgrade ── Origin ──▶ origin_allowed ── no ──▶ 403 before the upgrade
//!     │ token (query access_token, Authorization: Bearer, subprotocol pushfleet.bearer.<jwt>)
//!     ▼
//!  authenticate(token, now) ── Err ──▶ close 4401 (invalid) / 4402 (expired)
//!     │ Grant { topics, expires_at }
//!     ▼
//!  subscribe(filter) ── Grant::allows ── no ──▶ error "forbidden"; at expires_at: close 4402
//! ```
//!
//! Tokens follow RFC 8725: each key names the algorithms it may verify (`alg` is never taken
//! from the token alone, `none` is never accepted), `exp` is required, `nbf`, `aud` and `iss`
//! are checked, and a token naming a key (`kid`) is verified with that key only. Two keys with
//! different ids (or none) rotate: tokens signed by either verify until the old key is removed.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use protocol::client::{close, Filter, TopicPattern};
use serde_json::Value;
use std::path::PathBuf;
use std::str::FromStr;
use thiserror::Error;

/// One verification key as configured: `--auth-key 'id=2026-12,alg=RS256,pem-file=/etc/…'`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// Matched against a token's `kid` header; a token without `kid` tries every key.
    pub id: Option<String>,
    /// Algorithms this key verifies (RFC 8725 §3.1: one per key is best).
    pub algorithms: Vec<Algorithm>,
    /// Where the key is.
    pub source: KeySource,
}

/// Where a key's material is read from at start (never from the command line, where `ps`
/// would show it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// HS256/384/512: the file's bytes are the shared secret (one trailing newline dropped).
    SecretFile(PathBuf),
    /// RS*/PS*/ES*/EdDSA: a PEM public key (or certificate) file.
    PemFile(PathBuf),
}

impl FromStr for KeySpec {
    type Err = String;

    /// `[id=KID,]alg=ALG[|ALG…],secret-file=PATH|pem-file=PATH`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (mut id, mut algorithms, mut source) = (None, Vec::new(), None);
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("auth key {text:?}: {part:?} is not key=value"))?;
            match key {
                "id" => id = Some(value.to_string()),
                "alg" => {
                    for name in value.split('|') {
                        let alg = Algorithm::from_str(name.trim()).map_err(|_| {
                            format!(
                                "auth key {text:?}: unknown algorithm {name:?} (HS256, HS384, \
                                 HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, \
                                 ES384, EdDSA)"
                            )
                        })?;
                        algorithms.push(alg);
                    }
                }
                "secret-file" => source = Some(KeySource::SecretFile(value.into())),
                "pem-file" => source = Some(KeySource::PemFile(value.into())),
                _ => {
                    return Err(format!(
                        "auth key {text:?}: unknown key {key:?} (id, alg, secret-file, pem-file)"
                    ))
                }
            }
        }
        let source = source
            .ok_or_else(|| format!("auth key {text:?}: needs secret-file=PATH or pem-file=PATH"))?;
        if algorithms.is_empty() {
            return Err(format!(
                "auth key {text:?}: needs alg=… (the algorithms this key may verify)"
            ));
        }
        let hmac =
            |a: &Algorithm| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        match source {
            KeySource::SecretFile(_) if !algorithms.iter().all(hmac) => {
                return Err(format!(
                    "auth key {text:?}: a secret-file key verifies HS256/HS384/HS512 only"
                ))
            }
            KeySource::PemFile(_) if algorithms.iter().any(hmac) => {
                return Err(format!(
                    "auth key {text:?}: HS* algorithms need secret-file, not a public key"
                ))
            }
            _ => {}
        }
        Ok(KeySpec {
            id,
            algorithms,
            source,
        })
    }
}

/// The access settings, as `Config` holds them (see its `--help` texts).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Verification keys; none turns token checks off.
    pub keys: Vec<KeySpec>,
    /// Connections without a valid token are closed (4401) instead of getting anonymous
    /// access.
    pub required: bool,
    /// What a connection without a token may subscribe to.
    pub anonymous_topics: Vec<TopicPattern>,
    /// Accepted `aud` values (a token must name one); empty: `aud` not checked.
    pub audience: Vec<String>,
    /// Accepted `iss` values; empty: `iss` not checked.
    pub issuer: Vec<String>,
    /// The claim holding the token's topic patterns (a list of strings).
    pub topics_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, seconds.
    pub leeway_s: u64,
    /// Allowed `Origin` values (`https://app.example.com`, `https://*.example.com`); empty:
    /// any.
    pub origins: Vec<String>,
}

/// A key ready to verify.
struct Key {
    id: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// Access control as the worker applies it.
pub struct Access {
    keys: Vec<Key>,
    settings: Settings,
}

/// Why a key could not be loaded at start.
#[derive(Debug, Error)]
#[error("auth key {path}: {why}")]
pub struct KeyError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub why: String,
}

/// Why a token was refused; [`AccessError::close_code`] is what the client sees.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AccessError {
    /// Tokens are required and none was presented.
    #[error("an access token is required")]
    Missing,
    /// Not a JWT (three base64url parts with a JSON header).
    #[error("the access token is malformed")]
    Malformed,
    /// The token names a key (`kid`) the worker does not have.
    #[error("the access token's key {0:?} is unknown")]
    UnknownKey(String),
    /// No key with a matching id allows the token's algorithm.
    #[error("algorithm {0:?} is not allowed for the token's key")]
    AlgorithmNotAllowed(String),
    /// No key verifies the signature.
    #[error("the access token's signature does not verify")]
    BadSignature,
    /// `exp` is missing or not a number.
    #[error("the access token has no numeric exp")]
    NoExpiry,
    /// `exp` has passed.
    #[error("the access token expired at {0} (Unix seconds)")]
    Expired(u64),
    /// `nbf` is in the future.
    #[error("the access token is not valid before {0} (Unix seconds)")]
    NotYetValid(u64),
    /// `aud` names none of the accepted audiences.
    #[error("the access token is for another audience")]
    WrongAudience,
    /// `iss` is not an accepted issuer.
    #[error("the access token is from another issuer")]
    WrongIssuer,
    /// The topics claim is missing, not a list of strings, or holds a bad pattern.
    #[error("the access token's {0}")]
    BadTopics(String),
}

impl AccessError {
    /// The WebSocket close code: 4402 when a new token would help, 4401 otherwise.
    pub fn close_code(&self) -> u16 {
        match self {
            AccessError::Expired(_) => close::TOKEN_EXPIRED,
            _ => close::UNAUTHORIZED,
        }
    }

    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            AccessError::Missing => "missing",
            AccessError::Malformed => "malformed",
            AccessError::UnknownKey(_) => "unknown_key",
            AccessError::AlgorithmNotAllowed(_) => "algorithm_not_allowed",
            AccessError::BadSignature => "bad_signature",
            AccessError::NoExpiry => "no_expiry",
            AccessError::Expired(_) => "expired",
            AccessError::NotYetValid(_) => "not_yet_valid",
            AccessError::WrongAudience => "wrong_audience",
            AccessError::WrongIssuer => "wrong_issuer",
            AccessError::BadTopics(_) => "bad_topics",
        }
    }

    /// Every value [`AccessError::label`] returns.
    pub const LABELS: &'static [&'static str] = &[
        "missing",
        "malformed",
        "unknown_key",
        "algorithm_not_allowed",
        "bad_signature",
        "no_expiry",
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "wrong_issuer",
        "bad_topics",
    ];
}

/// What one connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's `sub`, for logs.
    pub subject: Option<String>,
    /// When the token expires (Unix seconds); the connection is closed with 4402 then.
    pub expires_at: Option<u64>,
    /// `None`: everything (access control off).
    topics: Option<Vec<TopicPattern>>,
}

impl Grant {
    /// Everything, for ever: access control is off.
    pub fn everything() -> Self {
        Grant {
            subject: None,
            expires_at: None,
            topics: None,
        }
    }

    /// Whether a subscription to `filter` is allowed.
    pub fn allows(&self, filter: &Filter) -> bool {
        self.topics
            .as_ref()
            .is_none_or(|topics| topics.iter().any(|p| p.covers(filter)))
    }
}

impl Access {
    /// Reads every key's file and checks it parses for its algorithms.
    pub fn load(settings: Settings) -> Result<Self, KeyError> {
        let mut keys = Vec::with_capacity(settings.keys.len());
        for spec in &settings.keys {
            let (path, key) = match &spec.source {
                KeySource::SecretFile(path) => {
                    let mut bytes = read(path)?;
                    if bytes.last() == Some(&b'\n') {
                        bytes.pop();
                    }
                    let key = if bytes.len() < 32 {
                        Err(format!(
                            "an HMAC secret of {} bytes is too short: use at least 32 random \
                             bytes (RFC 7518 §3.2)",
                            bytes.len()
                        ))
                    } else {
                        DecodingKey::from_secret(&bytes).map_err(|e| e.to_string())
                    };
                    (path, key)
                }
                KeySource::PemFile(path) => {
                    let pem = read(path)?;
                    let alg = spec.algorithms[0];
                    let key = match alg {
                        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                        Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                        _ => DecodingKey::from_rsa_pem(&pem),
                    };
                    (
                        path,
                        key.map_err(|e| format!("not a PEM public key for {alg:?}: {e}")),
                    )
                }
            };
            let key = key.map_err(|why| KeyError {
                path: path.clone(),
                why,
            })?;
            keys.push(Key {
                id: spec.id.clone(),
                algorithms: spec.algorithms.clone(),
                key,
            });
        }
        Ok(Access { keys, settings })
    }

    /// Access control off: every connection may subscribe to everything.
    pub fn open() -> Self {
        Access {
            keys: Vec::new(),
            settings: Settings::default(),
        }
    }

    /// Whether tokens are checked at all.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Whether a browser from `origin` may connect (RFC 6455 §10.2). Requests without `Origin`
    /// come from non-browser clients, which could send any value anyway: allowed.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        let origin = origin.trim().to_ascii_lowercase();
        self.settings.origins.is_empty()
            || self.settings.origins.iter().any(|allowed| {
                let allowed = allowed.to_ascii_lowercase();
                match allowed.split_once("://*.") {
                    // `https://*.example.com`: any subdomain, same scheme, not the apex.
                    Some((scheme, domain)) => origin
                        .strip_prefix(scheme)
                        .and_then(|rest| rest.strip_prefix("://"))
                        .and_then(|host| host.strip_suffix(domain))
                        .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                    None => origin == allowed,
                }
            })
    }

    /// Checks the token presented at connect (if any) at `now` (Unix seconds).
    pub fn authenticate(&self, token: Option<&str>, now: u64) -> Result<Grant, AccessError> {
        if !self.enabled() {
            return Ok(Grant::everything());
        }
        let anonymous = || Grant {
            subject: None,
            expires_at: None,
            topics: Some(self.settings.anonymous_topics.clone()),
        };
        let token = match token.map(str::trim).filter(|t| !t.is_empty()) {
            None if self.settings.required => return Err(AccessError::Missing),
            None => return Ok(anonymous()),
            Some(t) => t,
        };
        let claims = self.verify(token)?;
        let s = &self.settings;
        let exp = claims
            .get("exp")
            .and_then(Value::as_u64)
            .ok_or(AccessError::NoExpiry)?;
        if now > exp.saturating_add(s.leeway_s) {
            return Err(AccessError::Expired(exp));
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf.as_u64().ok_or(AccessError::Malformed)?;
            if nbf > now.saturating_add(s.leeway_s) {
                return Err(AccessError::NotYetValid(nbf));
            }
        }
        if !s.audience.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => s.audience.contains(a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| s.audience.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err(AccessError::WrongAudience);
            }
        }
        if !s.issuer.is_empty() {
            let iss = claims.get("iss").and_then(Value::as_str);
            if !iss.is_some_and(|i| s.issuer.iter().any(|x| x == i)) {
                return Err(AccessError::WrongIssuer);
            }
        }
        let mut topics = match claims.get(&s.topics_claim) {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| format!("{} claim holds a non-string", s.topics_claim))
                        .and_then(|p| TopicPattern::parse(p, &format!("{} claim", s.topics_claim)))
                        .map_err(AccessError::BadTopics)
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(AccessError::BadTopics(format!(
                    "{} claim is not a list of topic patterns",
                    s.topics_claim
                )))
            }
        };
        // A token never grants less than no token.
        topics.extend(s.anonymous_topics.iter().cloned());
        Ok(Grant {
            subject: claims.get("sub").and_then(Value::as_str).map(String::from),
            expires_at: Some(exp),
            topics: Some(topics),
        })
    }

    /// The verified claims: the right key by `kid` (or each key in turn without one), its
    /// algorithms only. Time, audience and issuer are checked by the caller with its `now`.
    fn verify(&self, token: &str) -> Result<serde_json::Map<String, Value>, AccessError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AccessError::Malformed)?;
        let alg = header.alg;
        let candidates: Vec<&Key> = match &header.kid {
            Some(kid) => {
                let named: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| k.id.as_deref() == Some(kid.as_str()))
                    .collect();
                if named.is_empty() {
                    return Err(AccessError::UnknownKey(kid.clone()));
                }
                named
            }
            None => self.keys.iter().collect(),
        };
        let allowed: Vec<&Key> = candidates
            .into_iter()
            .filter(|k| k.algorithms.contains(&alg))
            .collect();
        if allowed.is_empty() {
            return Err(AccessError::AlgorithmNotAllowed(format!("{alg:?}")));
        }
        let mut validation = Validation::new(alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        for key in allowed {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(data) => return Ok(data.claims),
                Err(e) => match e.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => continue,
                    jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => continue,
                    _ => return Err(AccessError::Malformed),
                },
            }
        }
        Err(AccessError::BadSignature)
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|e| KeyError {
        path: path.clone(),
        why: e.to_string(),
    })
}

/// The token a client presented in its upgrade request: the `access_token` query parameter
/// (RFC 6750 §2.3), an `Authorization: Bearer` header, or an offered subprotocol
/// `pushfleet.bearer.<token>` (browsers can set neither headers nor, safely, URLs that end up
/// in logs).
pub fn presented_token<'a>(
    query: Option<&'a str>,
    authorization: Option<&'a str>,
    protocols: &'a [String],
) -> Option<std::borrow::Cow<'a, str>> {
    if let Some(t) = protocols
        .iter()
        .find_map(|p| p.strip_prefix(BEARER_SUBPROTOCOL))
    {
        return Some(t.into());
    }
    if let Some(t) = authorization.and_then(|a| {
        a.split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
    }) {
        return Some(t.into());
    }
    query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v)
    })
}

/// Offered subprotocols starting with this carry the access token; the worker never selects
/// them (it answers `pushfleet.v1`, which the client must offer too).
pub const BEARER_SUBPROTOCOL: &str = "pushfleet.bearer.";

#[cfg(test)]
mod tests;
