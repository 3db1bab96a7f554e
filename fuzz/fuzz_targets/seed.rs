#![no_main]
//! Arbitrary bytes as user data and as a preseed file: an error is fine, a panic is not.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = troops::seed::userdata::parse(data, "fuzz");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = troops::seed::preseed::parse_preseed(text, "fuzz");
        let _ = troops::seed::preseed::parse_debconf_db(text, "fuzz");
    }
});
