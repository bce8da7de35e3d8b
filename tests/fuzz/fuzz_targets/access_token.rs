//! Access tokens on arbitrary input: finding the token in an upgrade request and verifying it
//! (header, key choice, signature, claims) must never panic, and nothing unsigned passes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use worker::access::{presented_token, Access, Settings};

fn access() -> &'static Access {
    static ACCESS: OnceLock<Access> = OnceLock::new();
    ACCESS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pushfleet-fuzz-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let secret = dir.join("secret");
        std::fs::write(&secret, b"fuzz-secret-fuzz-secret-fuzz-secret!").expect("secret file");
        let keys = vec![
            format!("id=h,alg=HS256,secret-file={}", secret.display()).parse().expect("spec"),
        ];
        Access::load(Settings {
            keys,
            required: true,
            topics_claim: "topics".into(),
            ..Settings::default()
        })
        .expect("key loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (query, rest) = text.split_once('\n').unwrap_or((text, ""));
    let (authorization, protocol) = rest.split_once('\n').unwrap_or((rest, ""));
    let protocols = vec![protocol.to_string()];
    let token = presented_token(Some(query), Some(authorization), &protocols);
    // Without the secret nothing can be signed: no fuzzed token may be accepted.
    assert!(access().authenticate(token.as_deref(), 1_800_000_000).is_err());
    assert!(access().authenticate(Some(text), 1_800_000_000).is_err());
});
