use super::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

const NOW: u64 = 1_800_000_000;
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";
const RSA_PRIVATE: &str = include_str!("../../testdata/rsa-private.pem");
const EC_PRIVATE: &str = include_str!("../../testdata/ec-private.pem");

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

/// A secret file in a fresh temporary directory.
fn secret_file(bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pushfleet-access-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("secret");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn spec(text: &str) -> KeySpec {
    text.parse().unwrap()
}

fn settings(keys: Vec<KeySpec>) -> Settings {
    Settings {
        keys,
        required: true,
        anonymous_topics: Vec::new(),
        audience: Vec::new(),
        issuer: Vec::new(),
        topics_claim: "topics".into(),
        leeway_s: 0,
        origins: Vec::new(),
    }
}

fn hs_access() -> Access {
    let path = secret_file(SECRET);
    Access::load(settings(vec![spec(&format!(
        "alg=HS256,secret-file={}",
        path.display()
    ))]))
    .unwrap()
}

fn hs_token(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

fn topic(t: &str) -> Filter {
    Filter::Topic(t.into())
}

fn prefix(p: &str) -> Filter {
    Filter::Prefix(p.into())
}

#[test]
fn a_valid_token_grants_its_topics_and_no_others() {
    let access = hs_access();
    let token = hs_token(json!({"exp": NOW + 60, "sub": "fan-7", "topics": ["match.*", "news.1"]}));
    let grant = access.authenticate(Some(&token), NOW).unwrap();
    assert_eq!(grant.subject.as_deref(), Some("fan-7"));
    assert_eq!(grant.expires_at, Some(NOW + 60));
    assert!(grant.allows(&topic("match.1")));
    assert!(grant.allows(&prefix("match.")));
    assert!(grant.allows(&prefix("match.1")));
    assert!(grant.allows(&topic("news.1")));
    assert!(!grant.allows(&topic("news.2")));
    assert!(
        !grant.allows(&prefix("news.")),
        "an exact topic grants no prefix"
    );
    assert!(
        !grant.allows(&prefix("mat")),
        "a shorter prefix reaches past the grant"
    );
    assert!(!grant.allows(&topic("admin.1")));
}

#[test]
fn expiry_and_not_before_are_checked_against_now_with_leeway() {
    let mut s = settings(vec![spec(&format!(
        "alg=HS256,secret-file={}",
        secret_file(SECRET).display()
    ))]);
    let strict = Access::load(s.clone()).unwrap();
    let expired = hs_token(json!({"exp": NOW - 1}));
    let err = strict.authenticate(Some(&expired), NOW).unwrap_err();
    assert_eq!(err, AccessError::Expired(NOW - 1));
    assert_eq!(err.close_code(), close::TOKEN_EXPIRED);
    let early = hs_token(json!({"exp": NOW + 600, "nbf": NOW + 30}));
    assert_eq!(
        strict.authenticate(Some(&early), NOW).unwrap_err(),
        AccessError::NotYetValid(NOW + 30)
    );
    assert_eq!(
        strict
            .authenticate(Some(&hs_token(json!({"sub": "x"}))), NOW)
            .unwrap_err(),
        AccessError::NoExpiry
    );
    s.leeway_s = 30;
    let lenient = Access::load(s).unwrap();
    assert!(lenient.authenticate(Some(&expired), NOW).is_ok());
    assert!(lenient.authenticate(Some(&early), NOW).is_ok());
    assert!(lenient.authenticate(Some(&expired), NOW + 31).is_err());
}

#[test]
fn audience_and_issuer_must_match_when_configured() {
    let mut s = settings(vec![spec(&format!(
        "alg=HS256,secret-file={}",
        secret_file(SECRET).display()
    ))]);
    s.audience = vec!["pushfleet".into()];
    s.issuer = vec!["https://auth.example.com".into()];
    let access = Access::load(s).unwrap();
    let good =
        json!({"exp": NOW + 60, "aud": ["other", "pushfleet"], "iss": "https://auth.example.com"});
    assert!(access.authenticate(Some(&hs_token(good)), NOW).is_ok());
    let wrong_aud = json!({"exp": NOW + 60, "aud": "other", "iss": "https://auth.example.com"});
    assert_eq!(
        access
            .authenticate(Some(&hs_token(wrong_aud)), NOW)
            .unwrap_err(),
        AccessError::WrongAudience
    );
    let no_aud = json!({"exp": NOW + 60, "iss": "https://auth.example.com"});
    assert_eq!(
        access
            .authenticate(Some(&hs_token(no_aud)), NOW)
            .unwrap_err(),
        AccessError::WrongAudience
    );
    let wrong_iss = json!({"exp": NOW + 60, "aud": "pushfleet", "iss": "https://evil.example"});
    let err = access
        .authenticate(Some(&hs_token(wrong_iss)), NOW)
        .unwrap_err();
    assert_eq!(err, AccessError::WrongIssuer);
    assert_eq!(err.close_code(), close::UNAUTHORIZED);
}

#[test]
fn rs256_and_es256_tokens_verify_with_their_public_keys() {
    let access = Access::load(settings(vec![
        spec(&format!(
            "id=rsa,alg=RS256,pem-file={}",
            testdata("rsa-public.pem").display()
        )),
        spec(&format!(
            "id=ec,alg=ES256,pem-file={}",
            testdata("ec-public.pem").display()
        )),
    ]))
    .unwrap();
    let claims = json!({"exp": NOW + 60, "topics": ["match.*"]});
    let mut rs = Header::new(Algorithm::RS256);
    rs.kid = Some("rsa".into());
    let rs_token = encode(
        &rs,
        &claims,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(access
        .authenticate(Some(&rs_token), NOW)
        .unwrap()
        .allows(&topic("match.3")));
    let mut es = Header::new(Algorithm::ES256);
    es.kid = Some("ec".into());
    let es_token = encode(
        &es,
        &claims,
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(access.authenticate(Some(&es_token), NOW).is_ok());
    // Without kid every key is tried, each with its own algorithms.
    let es_anonymous_kid = encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(access.authenticate(Some(&es_anonymous_kid), NOW).is_ok());
    // A tampered payload fails the signature.
    let mut parts: Vec<&str> = rs_token.split('.').collect();
    let forged = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        json!({"exp": NOW + 60, "topics": ["*"]}).to_string(),
    );
    parts[1] = &forged;
    assert_eq!(
        access
            .authenticate(Some(&parts.join(".")), NOW)
            .unwrap_err(),
        AccessError::BadSignature
    );
}

#[test]
fn algorithms_come_from_the_key_never_from_the_token() {
    let access = Access::load(settings(vec![spec(&format!(
        "id=rsa,alg=RS256,pem-file={}",
        testdata("rsa-public.pem").display()
    ))]))
    .unwrap();
    // The classic confusion: HS256 keyed with the RSA public key's text.
    let public = std::fs::read(testdata("rsa-public.pem")).unwrap();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa".into());
    let confused = encode(
        &h,
        &json!({"exp": NOW + 60, "topics": ["*"]}),
        &EncodingKey::from_secret(&public).unwrap(),
    )
    .unwrap();
    assert_eq!(
        access.authenticate(Some(&confused), NOW).unwrap_err(),
        AccessError::AlgorithmNotAllowed("HS256".into())
    );
    // alg "none": not an algorithm at all.
    let b64 = |v: serde_json::Value| {
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            v.to_string(),
        )
    };
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"exp": NOW + 60, "topics": ["*"]}))
    );
    assert_eq!(
        access.authenticate(Some(&none), NOW).unwrap_err(),
        AccessError::Malformed
    );
    assert_eq!(
        access.authenticate(Some("not-a-jwt"), NOW).unwrap_err(),
        AccessError::Malformed
    );
}

#[test]
fn two_keys_rotate_and_an_unknown_kid_is_refused() {
    let old_secret = b"old-secret-old-secret-old-secret-0001";
    let new_secret = b"new-secret-new-secret-new-secret-0002";
    let access = Access::load(settings(vec![
        spec(&format!(
            "id=old,alg=HS256,secret-file={}",
            secret_file(old_secret).display()
        )),
        spec(&format!(
            "id=new,alg=HS256,secret-file={}",
            secret_file(new_secret).display()
        )),
    ]))
    .unwrap();
    let claims = json!({"exp": NOW + 60});
    for (kid, secret) in [("old", &old_secret[..]), ("new", &new_secret[..])] {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(kid.into());
        let t = encode(&h, &claims, &EncodingKey::from_secret(secret).unwrap()).unwrap();
        assert!(access.authenticate(Some(&t), NOW).is_ok(), "key {kid}");
    }
    // Signed by the new key but naming the old one: that key alone is tried.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("old".into());
    let t = encode(&h, &claims, &EncodingKey::from_secret(new_secret).unwrap()).unwrap();
    assert_eq!(
        access.authenticate(Some(&t), NOW).unwrap_err(),
        AccessError::BadSignature
    );
    h.kid = Some("retired".into());
    let t = encode(&h, &claims, &EncodingKey::from_secret(new_secret).unwrap()).unwrap();
    assert_eq!(
        access.authenticate(Some(&t), NOW).unwrap_err(),
        AccessError::UnknownKey("retired".into())
    );
    // No kid: each key is tried.
    let t = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(new_secret).unwrap(),
    )
    .unwrap();
    assert!(access.authenticate(Some(&t), NOW).is_ok());
}

#[test]
fn without_a_token_required_refuses_and_optional_grants_the_anonymous_topics() {
    let mut s = settings(vec![spec(&format!(
        "alg=HS256,secret-file={}",
        secret_file(SECRET).display()
    ))]);
    s.anonymous_topics = vec![TopicPattern::parse("public.*", "anonymous").unwrap()];
    let required = Access::load(s.clone()).unwrap();
    let err = required.authenticate(None, NOW).unwrap_err();
    assert_eq!(err, AccessError::Missing);
    assert_eq!(err.close_code(), close::UNAUTHORIZED);
    s.required = false;
    let optional = Access::load(s).unwrap();
    let anonymous = optional.authenticate(None, NOW).unwrap();
    assert!(anonymous.allows(&topic("public.scores")));
    assert!(!anonymous.allows(&topic("match.1")));
    assert_eq!(anonymous.expires_at, None);
    // A token adds to the anonymous topics; a bad one is refused, never downgraded.
    let grant = optional
        .authenticate(
            Some(&hs_token(json!({"exp": NOW + 60, "topics": ["match.1"]}))),
            NOW,
        )
        .unwrap();
    assert!(grant.allows(&topic("match.1")) && grant.allows(&topic("public.x")));
    assert!(optional.authenticate(Some("garbage"), NOW).is_err());
}

#[test]
fn a_topics_claim_that_is_not_a_list_of_patterns_is_refused() {
    let access = hs_access();
    for bad in [json!("match.*"), json!([1, 2]), json!(["a*b"])] {
        let t = hs_token(json!({"exp": NOW + 60, "topics": bad}));
        assert!(
            matches!(
                access.authenticate(Some(&t), NOW),
                Err(AccessError::BadTopics(_))
            ),
            "{bad}"
        );
    }
}

#[test]
fn access_control_off_allows_everything() {
    let open = Access::open();
    assert!(!open.enabled());
    let grant = open.authenticate(None, NOW).unwrap();
    assert!(grant.allows(&prefix("")));
    assert!(open.origin_allowed(Some("https://anything.example")));
}

#[test]
fn origins_match_exactly_or_by_subdomain_wildcard() {
    let mut s = settings(Vec::new());
    s.origins = vec![
        "https://app.example.com".into(),
        "https://*.fans.example".into(),
    ];
    let access = Access {
        keys: Vec::new(),
        settings: s,
    };
    assert!(access.origin_allowed(Some("https://app.example.com")));
    assert!(access.origin_allowed(Some("HTTPS://APP.EXAMPLE.COM")));
    assert!(access.origin_allowed(Some("https://tv.fans.example")));
    assert!(access.origin_allowed(None), "non-browser clients send none");
    assert!(!access.origin_allowed(Some("http://app.example.com")));
    assert!(!access.origin_allowed(Some("https://app.example.com.evil.io")));
    assert!(!access.origin_allowed(Some("https://fans.example")));
    assert!(!access.origin_allowed(Some("https://evilfans.example")));
    assert!(!access.origin_allowed(Some("http://tv.fans.example")));
    assert!(!access.origin_allowed(Some("null")));
}

#[test]
fn key_specs_name_what_is_wrong() {
    assert_eq!(
        spec("id=k1,alg=RS256|PS256,pem-file=/etc/k.pem"),
        KeySpec {
            id: Some("k1".into()),
            algorithms: vec![Algorithm::RS256, Algorithm::PS256],
            source: KeySource::PemFile("/etc/k.pem".into()),
        }
    );
    for (text, expected) in [
        ("alg=HS256", "needs secret-file=PATH or pem-file=PATH"),
        ("secret-file=/k", "needs alg="),
        ("alg=none,secret-file=/k", "unknown algorithm"),
        (
            "alg=RS256,secret-file=/k",
            "verifies HS256/HS384/HS512 only",
        ),
        ("alg=HS256,pem-file=/k", "need secret-file"),
        ("alg=HS256,secret=abc", "unknown key \"secret\""),
        ("alg", "is not key=value"),
    ] {
        let err = text.parse::<KeySpec>().unwrap_err();
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn keys_that_cannot_be_used_stop_the_start() {
    let short = secret_file(b"short\n");
    let err = Access::load(settings(vec![spec(&format!(
        "alg=HS256,secret-file={}",
        short.display()
    ))]))
    .err()
    .unwrap();
    assert!(err.to_string().contains("too short"), "{err}");
    let err = Access::load(settings(vec![spec(
        "alg=RS256,pem-file=/nonexistent/key.pem",
    )]))
    .err()
    .unwrap();
    assert!(err.to_string().contains("/nonexistent/key.pem"), "{err}");
    let not_pem = secret_file(SECRET);
    let err = Access::load(settings(vec![spec(&format!(
        "alg=ES256,pem-file={}",
        not_pem.display()
    ))]))
    .err()
    .unwrap();
    assert!(err.to_string().contains("not a PEM public key"), "{err}");
}

#[test]
fn the_token_is_found_in_subprotocol_header_or_query() {
    let protocols = vec![
        "pushfleet.v1".to_string(),
        "pushfleet.bearer.aaa.bbb.ccc".into(),
    ];
    assert_eq!(
        presented_token(Some("access_token=q"), Some("Bearer h"), &protocols).as_deref(),
        Some("aaa.bbb.ccc")
    );
    assert_eq!(
        presented_token(Some("access_token=q"), Some("bearer h.t"), &[]).as_deref(),
        Some("h.t")
    );
    assert_eq!(
        presented_token(Some("x=1&access_token=a%2Eb"), Some("Basic abc"), &[]).as_deref(),
        Some("a.b")
    );
    assert_eq!(presented_token(Some("x=1"), None, &[]), None);
}
