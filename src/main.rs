//! The `keywarden` binary: everything lives in the library; see `keywarden::cli`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    // Started as the launcher of a confined program: confine, execute it, never return.
    keywarden::sandbox::run_if_launcher();
    // Test builds read their crash points from FAILPOINTS (see `crash_point!`).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    keywarden::cli::main()
}
