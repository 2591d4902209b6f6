//! What an operator installs: the systemd unit (checked by `systemd-analyze verify`, and its
//! exposure by `systemd-analyze security`), `deploy/install.sh` run into a temporary root twice,
//! and the Debian package `deploy/debian/build.sh` makes (its files, modes, conffile, scripts,
//! and the config's plugin pins, which must match the plugins it installs).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where the test build's binaries are (`cargo test --workspace` builds every one).
fn built() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_keywarden"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Whether `tool` can run here; under CI its absence fails the test.
fn have(tool: &str, what: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "{tool} is needed: {what}");
        eprintln!("skipping: {tool} is not installed ({what})");
    }
    found
}

fn sha256(path: &Path) -> String {
    keywarden::crypto::file_sha256(path).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// The pins in a config: (plugin command, sha256).
fn pins(config: &str) -> Vec<(String, String)> {
    let parsed: toml::Value = toml::from_str(config).unwrap();
    parsed["plugins"]
        .as_table()
        .unwrap()
        .values()
        .map(|p| {
            (
                p["command"][0].as_str().unwrap().to_string(),
                p["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_unit_verifies_and_its_exposure_is_at_most_2() {
    if !have("systemd-analyze", "to check the unit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // verify wants ExecStart's program to exist: the binary this test built.
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/keywarden.service"))
        .unwrap()
        .replace("/usr/bin/keywarden", env!("CARGO_BIN_EXE_keywarden"));
    let path = dir.path().join("keywarden.service");
    std::fs::write(&path, unit).unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(security.status.success(), "exposure above 2.0:\n{report}");
    assert!(
        report.contains("Overall exposure level for keywarden.service: 2.0"),
        "{report}"
    );
}

#[test]
fn install_sh_into_a_temporary_root_twice_is_idempotent_and_keeps_a_changed_config() {
    let root = tempfile::tempdir().unwrap();
    let install = || {
        let out = Command::new(repo().join("deploy/install.sh"))
            .args(["--prefix", "/usr/local", "--bindir"])
            .arg(built())
            .env("DESTDIR", root.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    install();
    let r = |p: &str| root.path().join(p.trim_start_matches('/'));
    for (path, expected) in [
        ("/usr/local/bin/keywarden", 0o755),
        ("/usr/local/bin/keywarden-broker", 0o755),
        ("/usr/local/libexec/keywarden/keywarden-plugin-aws", 0o755),
        ("/usr/local/libexec/keywarden/keywarden-plugin-http", 0o755),
        ("/usr/local/libexec/keywarden/keywarden-plugin-db", 0o755),
        ("/usr/local/lib/systemd/system/keywarden.service", 0o644),
        ("/usr/local/lib/sysusers.d/keywarden.conf", 0o644),
        ("/usr/local/lib/tmpfiles.d/keywarden.conf", 0o644),
        ("/etc/keywarden", 0o750),
        ("/etc/keywarden/keywarden.toml", 0o640),
    ] {
        assert_eq!(mode(&r(path)), expected, "{path}");
    }
    let unit =
        std::fs::read_to_string(r("/usr/local/lib/systemd/system/keywarden.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/keywarden serve"),
        "{unit}"
    );
    // Each plugin is pinned to the file installed.
    let config = std::fs::read_to_string(r("/etc/keywarden/keywarden.toml")).unwrap();
    let pinned = pins(&config);
    assert_eq!(pinned.len(), 3);
    for (command, sha) in &pinned {
        assert!(
            command.starts_with("/usr/local/libexec/keywarden/"),
            "{command}"
        );
        assert_eq!(&sha256(&r(command)), sha, "{command}");
    }
    // The config parses as keywarden reads it.
    let out = Command::new(env!("CARGO_BIN_EXE_keywarden"))
        .arg("--config")
        .arg(r("/etc/keywarden/keywarden.toml"))
        .args(["list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("invalid config"), "{err}");

    // Again: nothing changes, nothing is written beside the config.
    let before = std::fs::read(r("/etc/keywarden/keywarden.toml")).unwrap();
    let said = install();
    assert!(!said.contains("kept your"), "{said}");
    assert_eq!(
        std::fs::read(r("/etc/keywarden/keywarden.toml")).unwrap(),
        before
    );
    assert!(!r("/etc/keywarden/keywarden.toml.new").exists());

    // A changed config is kept; the new default is written beside it.
    std::fs::write(r("/etc/keywarden/keywarden.toml"), "# mine\n").unwrap();
    let said = install();
    assert!(said.contains("kept your"), "{said}");
    assert_eq!(
        std::fs::read_to_string(r("/etc/keywarden/keywarden.toml")).unwrap(),
        "# mine\n"
    );
    assert_eq!(
        std::fs::read(r("/etc/keywarden/keywarden.toml.new")).unwrap(),
        before
    );
}

#[test]
fn the_debian_package_installs_the_binaries_the_unit_the_users_and_a_config_pinned_to_its_plugins()
{
    if !have(
        "cargo-deb",
        "to build the Debian package (cargo install cargo-deb)",
    ) || !have("dpkg-deb", "to read the Debian package")
    {
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    // The test build's binaries, unstripped (--profile dev), compressed fast.
    let build = Command::new(repo().join("deploy/debian/build.sh"))
        .args(["--profile", "dev", "--no-build", "--fast", "--output"])
        .arg(out_dir.path())
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let deb = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let root = tempfile::tempdir().unwrap();
    let extract = |args: &[&str], into: &Path| {
        let ok = Command::new("dpkg-deb")
            .args(args)
            .arg(&deb)
            .arg(into)
            .status()
            .unwrap();
        assert!(ok.success());
    };
    extract(&["-x"], root.path());
    let control = root.path().join("DEBIAN");
    extract(&["-e"], &control);
    let r = |p: &str| root.path().join(p.trim_start_matches('/'));
    for path in [
        "/usr/bin/keywarden",
        "/usr/bin/keywarden-broker",
        "/usr/libexec/keywarden/keywarden-plugin-aws",
        "/usr/libexec/keywarden/keywarden-plugin-http",
        "/usr/libexec/keywarden/keywarden-plugin-db",
    ] {
        assert_eq!(mode(&r(path)), 0o755, "{path}");
    }
    assert_eq!(
        std::fs::read(r("/usr/lib/systemd/system/keywarden.service")).unwrap(),
        std::fs::read(repo().join("deploy/systemd/keywarden.service")).unwrap()
    );
    let sysusers = std::fs::read_to_string(r("/usr/lib/sysusers.d/keywarden.conf")).unwrap();
    assert!(sysusers.contains("u keywarden ") && sysusers.contains("u keywarden-plugin "));
    assert!(r("/usr/lib/tmpfiles.d/keywarden.conf").exists());
    assert_eq!(mode(&r("/etc/keywarden/keywarden.toml")), 0o640);
    let config = std::fs::read_to_string(r("/etc/keywarden/keywarden.toml")).unwrap();
    for (command, sha) in pins(&config) {
        assert_eq!(sha256(&r(&command)), sha, "{command}");
    }
    // The config is a conffile: dpkg never overwrites a changed one.
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert_eq!(conffiles.trim(), "/etc/keywarden/keywarden.toml");
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    for needed in [
        "systemd-sysusers",
        "keywarden.conf",
        "deb-systemd-helper enable keywarden.service",
        "chmod 0640 /etc/keywarden/keywarden.toml",
    ] {
        assert!(
            postinst.contains(needed),
            "postinst lacks {needed}:\n{postinst}"
        );
    }
    // Installing does not start a service that has no store or passphrase yet.
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");
    for script in ["postinst", "prerm", "postrm"] {
        let syntax = Command::new("sh")
            .arg("-n")
            .arg(control.join(script))
            .status()
            .unwrap();
        assert!(syntax.success(), "{script}");
    }
}
