//! `keywarden scan` over a home of 100,000 files (the real binary, release build): a tree of
//! project directories, each with source files, a `.env` every tenth directory (a third of
//! them holding a credential) and a Terraform file every hundredth. Prints the files in the
//! home per second and what was found; the baseline beside it is `find HOME -type f | wc -l`
//! over the same tree in the same run (a walk with no reading), so the ratio is what reading
//! and matching cost.
//!
//! Run with `cargo bench --bench scan [-- --files N]` (default 100,000).

use std::path::Path;
use std::time::Instant;

use keywarden_testkit::Env;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let files: usize = args
        .iter()
        .position(|a| a == "--files")
        .map_or(100_000, |i| args[i + 1].parse().expect("--files N"));
    let env = Env::new();
    let home = env.dir.path().join("home");
    let planted = plant(&home, files);

    let start = Instant::now();
    let find = std::process::Command::new("find")
        .arg(&home)
        .args(["-type", "f"])
        .output()
        .unwrap();
    let walk = start.elapsed().as_secs_f64();
    let counted = find.stdout.iter().filter(|b| **b == b'\n').count();
    assert_eq!(counted, files);

    let start = Instant::now();
    let out = env.run(&["scan", "--home", home.to_str().unwrap(), "--json"], None);
    let scan = start.elapsed().as_secs_f64();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let found = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["place"]
                .as_str()
                .unwrap()
                .starts_with(home.to_str().unwrap())
        })
        .count();
    assert_eq!(found, planted, "every planted credential is found");

    println!("| home of {files} files | figure |");
    println!("|---|---|");
    println!(
        "| `keywarden scan --home` | {scan:.2} s ({:.0} files/s), {} read, {found} finding(s) |",
        files as f64 / scan,
        report["files_scanned"]
    );
    println!(
        "| `find -type f` over the same tree (walk only) | {walk:.2} s ({:.0} files/s) |",
        files as f64 / walk
    );
    println!("| ratio scan / walk | {:.1} |", scan / walk);
}

/// Writes `files` files under `home`; returns how many credentials were planted.
fn plant(home: &Path, files: usize) -> usize {
    let mut planted = 0;
    let mut written = 0;
    let mut dir_index = 0;
    while written < files {
        let dir = home.join(format!("projects/p{}/src/m{}", dir_index / 50, dir_index));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..10 {
            if written == files {
                break;
            }
            let (name, text) = if f == 0 && dir_index % 10 == 0 {
                let secret = dir_index % 30 == 0;
                if secret {
                    planted += 1;
                }
                let value = if secret {
                    format!("OPENAI_API_KEY=sk-proj-{:0>40}\n", dir_index)
                } else {
                    "PORT=8080\n".to_string()
                };
                (".env".to_string(), format!("# settings\n{value}"))
            } else if f == 1 && dir_index % 100 == 0 {
                (
                    "main.tfvars".to_string(),
                    "region = \"eu-west-1\"\n".to_string(),
                )
            } else {
                (format!("file{f}.rs"), "fn main() {}\n".repeat(20))
            };
            std::fs::write(dir.join(name), text).unwrap();
            written += 1;
        }
        dir_index += 1;
    }
    planted
}
