//! `Settings::load` on any file content: no panic; a refused file names at least one
//! problem, each with a key.
#![no_main]

use std::sync::OnceLock;

use edgetwin::config::Settings;
use libfuzzer_sys::fuzz_target;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"));
    let path = dir.path().join("edgetwin.toml");
    std::fs::write(&path, data).expect("written");
    if let Err(errors) = Settings::load(Some(&path)) {
        assert!(!errors.is_empty(), "a refusal names its problems");
        let _ = errors.to_string();
    }
});
