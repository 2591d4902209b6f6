//! Property tests of the parsers that take input from outside (the fuzzing drill, with proptest:
//! this machine has no nightly toolchain for cargo-fuzz): the config loader, secret names,
//! consumer templates, `scan`'s patterns, the plugin protocol's request reader and the signal
//! listener's payloads (signals, leak reports). On any input
//! each answers with a value or an error, never a panic, and what it accepts keeps its
//! invariants. Inputs are random text and random edits of the committed seeds
//! (`tests/seeds/`); a failure is shrunk by proptest and its input kept in
//! `tests/properties.proptest-regressions`, replayed first on every run (commit it with the
//! fix). `cargo test --test properties` runs 256 cases per property; `drills/fuzz SECS` runs
//! as many as fit in SECS seconds.

use std::path::Path;

use keywarden::config::Config;
use keywarden::consumer::{Delivery, Template};
use keywarden::value::SecretValue;
use proptest::prelude::*;

/// The seeds of one kind (`tests/seeds/KIND-*`), read once.
fn seeds(kind: &str) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seeds");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(kind))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    found.sort();
    assert!(!found.is_empty(), "no seeds {kind}-* in {}", dir.display());
    found
}

/// One edit of a text: a character inserted, removed or replaced at a place.
#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, char),
    Remove(usize),
    Replace(usize, char),
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for edit in edits {
        let at = |i: usize, n: usize| if n == 0 { 0 } else { i % n };
        match *edit {
            Edit::Insert(i, c) => {
                let i = at(i, chars.len() + 1);
                chars.insert(i, c);
            }
            Edit::Remove(i) if !chars.is_empty() => {
                let i = at(i, chars.len());
                chars.remove(i);
            }
            Edit::Replace(i, c) if !chars.is_empty() => {
                let i = at(i, chars.len());
                chars[i] = c;
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

/// A seed of `kind` with up to 8 random edits; the characters edits bring in are the ones
/// that matter to these grammars more often than not.
fn mutated(kind: &str) -> impl Strategy<Value = String> {
    let seeds = seeds(kind);
    let chars = prop_oneof![
        3 => prop::sample::select(vec![
            '"', '\'', '[', ']', '{', '}', '=', '\n', '.', ',', '/', '\\', '#', ' ', '*', '$', '-',
        ]),
        1 => any::<char>(),
    ];
    let edit = prop_oneof![
        (any::<usize>(), chars.clone()).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<usize>().prop_map(Edit::Remove),
        (any::<usize>(), chars).prop_map(|(i, c)| Edit::Replace(i, c)),
    ];
    (
        prop::sample::select(seeds),
        prop::collection::vec(edit, 0..8),
    )
        .prop_map(|(seed, edits)| apply(&seed, &edits))
}

proptest! {
    #[test]
    fn the_config_loader_answers_any_text_with_a_config_or_an_error(text in any::<String>()) {
        let _ = Config::parse(&text, Path::new("fuzz.toml"));
    }

    #[test]
    fn the_config_loader_answers_edited_configs_and_its_errors_name_the_file(text in mutated("config")) {
        if let Err(e) = Config::parse(&text, Path::new("fuzz.toml")) {
            let message = e.to_string();
            prop_assert!(message.contains("fuzz.toml"), "{message}");
        }
    }

    #[test]
    fn a_name_it_accepts_is_safe_in_a_path_a_url_and_a_glob(name in "[a-z./_\\-A-Z0-9*?%]{0,210}|\\PC{0,40}") {
        if keywarden::name::validate(&name).is_ok() {
            prop_assert!(!name.is_empty() && name.len() <= 200);
            prop_assert!(!name.starts_with('/') && !name.ends_with('/'));
            prop_assert!(name.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
            prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b)));
        }
    }

    #[test]
    fn a_line_based_template_never_lets_a_value_add_a_line(
        text in mutated("template"),
        value in "\\PC{0,20}(\n|\r|\u{0}|)\\PC{0,20}",
    ) {
        if let Ok(template) = Template::parse(&text) {
            let value = SecretValue::new(value);
            let mut meta = keywarden::vault::Meta::new();
            meta.insert("username".into(), serde_json::json!("svc\nLD_PRELOAD=/tmp/x.so"));
            let delivery = Delivery { secret: "app/db", version: 3, value: &value, meta: &meta };
            let line_based = text.contains('\n') || text.contains('\r');
            if let Ok(out) = template.render(&delivery) {
                if line_based {
                    // Every line of the output is a line of the template, with placeholders
                    // filled: never more lines than the template has.
                    prop_assert!(out.lines().count() <= text.lines().count().max(1), "{text:?}");
                }
            }
        }
    }

    #[test]
    fn scan_finds_a_planted_key_whatever_surrounds_it(
        before in "\\PC{0,200}",
        body in "[A-Za-z0-9]{20,60}",
        after in "\\PC{0,200}",
    ) {
        let key = format!("sk-ant-api03-{body}");
        let text = format!("{before} {key} {after}");
        let found = keywarden::scan::patterns::find(&text);
        prop_assert!(
            found.iter().any(|m| m.kind == "anthropic-key" && m.value.expose().starts_with(&key)),
            "not found in {text:?}"
        );
    }

    #[test]
    fn scan_answers_any_text(text in any::<String>(), seeded in mutated("scan")) {
        let _ = keywarden::scan::patterns::find(&text);
        let _ = keywarden::scan::patterns::find(&seeded);
    }

    #[test]
    fn a_plugin_request_line_parses_or_is_refused(line in mutated("plugin"), noise in any::<String>()) {
        for text in [line.as_str(), noise.as_str()] {
            for one in text.lines() {
                let _ = serde_json::from_str::<keywarden_plugin_sdk::Request>(one);
                let _ = keywarden_plugin_sdk::Op::parse(one);
            }
        }
    }
}

proptest! {
    #[test]
    fn a_signal_or_leak_payload_parses_or_is_refused_without_repeating_what_it_holds(
        signal in mutated("signal"),
        leak in mutated("leak"),
        noise in any::<Vec<u8>>(),
        body in "[A-Za-z0-9]{24,40}",
        shape in 0..6usize,
    ) {
        use keywarden::incident::signals::{parse_leak, parse_signal};
        // A leaked token where the parser expects something else: serde's own messages
        // repeat such strings ("invalid type: string \"…\"").
        let token = format!("ghp_{body}");
        let planted = [
            format!("[\"{token}\"]"),
            format!("{{\"token\": \"{token}\"}}"),
            format!("[{{\"token\": [\"{token}\"]}}]"),
            format!("[{{\"token\": \"{token}\", \"type\": 7}}]"),
            format!("{{\"type\": \"alert\", \"{token}\": 1}}"),
            format!("{{\"type\": 1, \"message\": \"{token}\", \"scope\": \"{token}\"}}"),
        ];
        for text in [signal.as_bytes(), leak.as_bytes(), &noise, planted[shape].as_bytes()] {
            let errors = [
                parse_signal(text).err().map(|e| e.to_string()),
                parse_leak(text).err().map(|e| e.to_string()),
            ];
            for message in errors.into_iter().flatten() {
                prop_assert!(!message.contains(&token) && !message.contains("ghp_") && !message.contains("sk-proj"), "{message}");
            }
        }
    }
}

/// Every seed itself is accepted where it should be: the random edits start from valid input.
#[test]
fn the_seeds_are_valid_input() {
    for config in seeds("config") {
        let parsed = Config::parse(&config, Path::new("seed.toml"));
        assert!(parsed.is_ok(), "{parsed:?}");
    }
    for template in seeds("template") {
        assert!(Template::parse(&template).is_ok(), "{template:?}");
    }
    for text in seeds("scan") {
        assert!(
            keywarden::scan::patterns::find(&text).len() >= 3,
            "{text:?}"
        );
    }
    for signal in seeds("signal") {
        let parsed = keywarden::incident::signals::parse_signal(signal.as_bytes());
        assert!(parsed.is_ok(), "{parsed:?}");
    }
    for leak in seeds("leak") {
        let parsed = keywarden::incident::signals::parse_leak(leak.as_bytes());
        assert!(parsed.is_ok_and(|items| items.len() == 2), "{leak}");
    }
    for line in seeds("plugin")
        .iter()
        .flat_map(|s| s.lines().map(str::to_string).collect::<Vec<_>>())
    {
        assert!(
            serde_json::from_str::<keywarden_plugin_sdk::Request>(&line).is_ok(),
            "{line}"
        );
    }
}
