//! The `keywarden` binary: everything lives in the library; see `keywarden::cli`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    keywarden::cli::main()
}
