//! The `keywarden` binary: everything lives in the library; see `keywarden::cli`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    // Test builds read their crash points from FAILPOINTS (see `crash_point!`).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    keywarden::cli::main()
}
