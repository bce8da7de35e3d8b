//! Herald's load report decoder on arbitrary bytes: it must never panic, a report it accepts
//! passes every range check, and re-encoding an accepted report decodes to the same report.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::load::LoadReport;

fuzz_target!(|data: &[u8]| {
    let Ok(report) = LoadReport::decode(data) else {
        return;
    };
    report.check().expect("an accepted report is in range");
    let again = LoadReport::decode(&report.encode()).expect("a re-encoded report decodes");
    assert_eq!(again, report);
});
