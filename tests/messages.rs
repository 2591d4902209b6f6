//! What a new user sees when something is wrong: each message says what happened and what to
//! do, once, and a failed first start leaves nothing behind.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::Env;

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_missing_config_or_passphrase_file_names_the_os_error_once() {
    let env = Env::new();
    let out = env.run(&["--config", "/nonexistent/keywarden.toml", "status"], None);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("/nonexistent/keywarden.toml"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");

    let mut cmd = env.cmd();
    cmd.env("KEYWARDEN_PASSPHRASE_FILE", "/nonexistent/passphrase");
    let out = common::run_with(cmd, &["init"], None);
    let err = stderr_of(&out);
    assert!(err.contains("/nonexistent/passphrase"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn an_empty_passphrase_variable_is_named_not_called_wrong() {
    let env = Env::initialized();
    let mut cmd = env.cmd();
    cmd.env_remove("KEYWARDEN_PASSPHRASE_FILE")
        .env("KEYWARDEN_PASSPHRASE", "");
    let out = common::run_with(cmd, &["serve"], None);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("KEYWARDEN_PASSPHRASE (set, but to nothing) is empty"),
        "{err}"
    );
    assert!(!err.contains("wrong passphrase"), "{err}");
}

#[test]
fn serve_init_with_a_bad_config_leaves_no_store() {
    let env = Env::with_config(&format!(
        "{}\n[secrets.\"app/x\"]\nprovider = \"no-such-provider\"\n",
        common::daemon::base_config("2s")
    ));
    let (code, err) = env.serve_fails();
    assert_eq!(code, Some(1));
    assert!(err.contains("no-such-provider"), "{err}");
    assert!(
        err.contains("the store this start created was removed"),
        "{err}"
    );
    assert!(!env.store.exists(), "no store is left behind");
    assert!(!env.store.with_extension("db.lock").exists());
}

#[test]
fn exec_without_a_daemon_says_it_is_not_running() {
    let env = Env::with_config(&common::daemon::base_config("2s"));
    let out = env.run(&["exec", "--env", "X=app/x", "--", "true"], None);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("the keywarden daemon is not running") && err.contains("keywarden serve"),
        "{err}"
    );
}

#[test]
fn a_store_in_a_directory_this_user_cannot_enter_is_permission_denied_not_missing() {
    if !rustix::process::getuid().is_root() {
        eprintln!("needs root to run the CLI as another user");
        return;
    }
    let env = Env::initialized();
    let private = env.store.parent().unwrap();
    std::fs::set_permissions(private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(common::keywarden_bin())
        .args(["--config", env.config.to_str().unwrap(), "list"]);
    let out = cmd.output().unwrap();
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permission denied")
            && err.contains(&format!(
                "{} belongs to root (uid 0), mode 700",
                private.display()
            )),
        "{err}"
    );
    assert!(!err.contains("no store at"), "{err}");
}

#[test]
fn init_refuses_a_short_passphrase_typed_at_a_terminal_unless_told() {
    let env = Env::new();
    let run_on_a_terminal = |args: &str| {
        // `script` gives the command a terminal; what we write to it is what is typed.
        let mut child = std::process::Command::new("script")
            .args([
                "-qec",
                &format!("{} {args}", common::keywarden_bin().display()),
                "/dev/null",
            ])
            .env_remove("KEYWARDEN_PASSPHRASE")
            .env_remove("KEYWARDEN_PASSPHRASE_FILE")
            .env("KEYWARDEN_CONFIG", &env.config)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut typed = child.stdin.take().unwrap();
        typed.write_all(b"abc\nabc\n").unwrap();
        drop(typed);
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let refused = run_on_a_terminal("init");
    assert!(refused.contains("too easy to guess"), "{refused}");
    assert!(!env.store.exists());
    let accepted = run_on_a_terminal("init --weak-passphrase");
    assert!(accepted.contains("created a store"), "{accepted}");
    assert!(env.store.exists());
}

#[test]
fn without_config_or_variable_the_users_config_file_is_found() {
    if std::path::Path::new("/etc/keywarden/keywarden.toml").exists() {
        eprintln!("this machine has /etc/keywarden/keywarden.toml, which comes first");
        return;
    }
    let env = Env::initialized();
    env.put("found/me", "v");
    let home = env.dir.path().join("home");
    let dir = home.join(".config/keywarden");
    std::fs::create_dir_all(&dir).unwrap();
    let config = std::fs::read_to_string(&env.config).unwrap().replace(
        "path = \"data/vault.db\"",
        &format!("path = {:?}", env.store.display().to_string()),
    );
    std::fs::write(dir.join("keywarden.toml"), config).unwrap();
    let mut cmd = env.cmd();
    cmd.env_remove("KEYWARDEN_CONFIG")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", &home);
    let out = common::run_with(cmd, &["list"], None);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(listed.contains("found/me"), "{listed}");
}
