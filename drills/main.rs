//! The reliability drills, run one at a time by name (`drills/run NAME [OPTIONS]`, which runs
//! this binary in the test profile so the daemon it drives has its crash points):
//!
//! - `crash [--secrets N] [--kills N] [--max-life MS] [--seed N]`: SIGKILLs at random instants
//!   and at every crash point, then checks nothing was lost, orphaned or left unaudited;
//! - `faults [--only plugin|store|broker|postgres]`: plugin misbehaviour, a removed consumer
//!   directory, a locked store, a full file system, a broker upstream refusing connections, a
//!   PostgreSQL leader cut off; each must show a clear error and clear by itself (time measured);
//! - `hostile [--requests N] [--seed N]`: malformed, oversized, slow and foreign clients
//!   against a live daemon while legitimate agents fetch (their p99 measured);
//! - `soak [--minutes 10] [--clients 8]`: fetches, brokered requests, watchers, rotations every
//!   few seconds and an incident at once: no failed request, no stale answer, memory and
//!   descriptors flat;
//!
//! each ends with the secrets-hygiene sweep, prints its figures and exits non-zero on any
//! violation. `cargo test` runs this binary with no drill named: it then only says so.

mod checks;
mod crash;
mod faults;
mod hostile;
mod hygiene;
mod kit;
mod soak;

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

fn usage() -> &'static str {
    "drills: crash [--secrets N] [--kills N] [--max-life MS] [--seed N] | faults [--only plugin|store|broker|postgres] | hostile [--requests N] [--seed N] | soak [--minutes N] [--clients N]"
}

/// `--name VALUE` pairs after the drill's name.
fn options(args: &[String]) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected {flag:?}"))?;
        let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        out.insert(name.to_string(), value.clone());
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--quiet" && a != "-q")
        .collect();
    // `cargo test` passes harness flags (--quiet, test filters) or nothing: no drill then.
    let Some(drill) = args.first().filter(|a| !a.starts_with('-')) else {
        println!("{}\n(no drill named: nothing to do)", usage());
        return ExitCode::SUCCESS;
    };
    let opts = match options(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{}", usage());
            return ExitCode::from(2);
        }
    };
    let number = |name: &str, default: u64| -> Result<u64, String> {
        opts.get(name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("--{name} needs a number, not {v:?}"))
        })
    };
    let run = || -> Result<usize, String> {
        Ok(match drill.as_str() {
            "crash" => crash::run(&crash::Options {
                secrets: number("secrets", 500)? as usize,
                kills: number("kills", 1000)? as usize,
                max_life: Duration::from_millis(number("max-life", 1500)?),
                seed: number("seed", kit::clock_seed())?,
            }),
            "faults" => faults::run(opts.get("only").map(String::as_str)),
            "hostile" => hostile::run(
                number("requests", 10_000)? as usize,
                number("seed", kit::clock_seed())?,
            ),
            "soak" => soak::run(number("minutes", 10)?, number("clients", 8)? as usize),
            other => return Err(format!("no drill {other:?}")),
        })
    };
    let violations = match run() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}\n{}", usage());
            return ExitCode::from(2);
        }
    };
    if violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
