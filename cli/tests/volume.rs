//! `sail volume ...`, `sail --help`, completions and the errors a person meets first, as
//! docs/cli.md writes them, against a real `sail up` and real FUSE mounts.

mod common;

use common::{Up, closed_port, is_hex_id, sail_with, write_file};

#[test]
fn volume_commands_as_documented() {
    let up = Up::start();

    // create: human line, then the same volume again (no error) as JSON.
    let out = up.sail(&["volume", "create", "ws"]).ok();
    assert!(out.starts_with("volume cli-tests/ws (id "), "{out}");
    let v = up.sail(&["--json", "volume", "create", "ws"]).json();
    for key in ["id", "org", "name", "head", "commits", "created_unix_ms"] {
        assert!(v.get(key).is_some(), "volume JSON lacks {key}: {v}");
    }
    assert_eq!(v["name"], "ws");
    assert_eq!(v["org"], "cli-tests");

    // put: a directory and a file in one commit, under --dest.
    let src = up.path("src");
    write_file(&src.join("a.txt"), b"alpha\n");
    write_file(&src.join("sub/b.bin"), &[7u8; 70_000]);
    let single = up.path("single.txt");
    write_file(&single, b"single\n");
    let out = up.sail(&["volume", "put", "ws", src.to_str().unwrap(), single.to_str().unwrap(), "--dest", "in"]).ok();
    assert!(out.starts_with("committed 3 files"), "{out}");
    let again = up.sail(&["--json", "volume", "put", "ws", single.to_str().unwrap()]).json();
    for key in ["commit", "seq", "merged", "files", "bytes", "chunks_uploaded", "bytes_uploaded", "chunks_skipped", "seconds"] {
        assert!(again.get(key).is_some(), "put JSON lacks {key}: {again}");
    }
    assert!(is_hex_id(again["commit"].as_str().unwrap()), "{again}");
    // The same bytes under another path: the chunk is stored already.
    assert_eq!(again["chunks_uploaded"], 0, "{again}");
    assert_eq!(again["chunks_skipped"], 1, "{again}");

    // list: one line per entry; --json one object per line.
    let out = up.sail(&["volume", "list", "ws", "in/src"]).ok();
    assert!(out.lines().any(|l| l.starts_with("file") && l.ends_with(" a.txt")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("dir") && l.ends_with(" sub")), "{out}");
    let rows = up.sail(&["--json", "volume", "list", "ws"]).ok();
    let names: Vec<String> = rows
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line")["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["in", "single.txt"]);

    // cat: the exact bytes.
    assert_eq!(up.sail(&["volume", "cat", "ws", "in/src/sub/b.bin"]).stdout, vec![7u8; 70_000]);
    assert_eq!(up.sail(&["volume", "cat", "ws", "in/single.txt"]).ok(), "single\n");

    // log: newest first.
    let out = up.sail(&["volume", "log", "ws"]).ok();
    let seqs: Vec<&str> = out.lines().map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(seqs, ["#2", "#1", "#0"], "{out}");
    assert!(out.lines().last().is_some_and(|l| l.ends_with("volume created")), "{out}");
    let log = up.sail(&["--json", "volume", "log", "ws", "--limit", "1"]).json();
    assert_eq!(log.as_array().map(Vec::len), Some(1), "{log}");
    assert_eq!(log[0]["seq"], 2);
    // `volume put` commits as this host's CLI; the table shows it before the message.
    let author = log[0]["author"].as_str().unwrap_or_default();
    assert!(author.starts_with("cli/") && author.len() > 4, "{log}");
    assert!(out.lines().next().is_some_and(|l| l.split_whitespace().any(|w| w == author)), "{out}");

    // ls: the volume is there; rm: and then it is not.
    assert!(up.sail(&["volume", "ls"]).ok().lines().any(|l| l.starts_with("ws ")));
    let all = up.sail(&["--json", "volume", "ls"]).json();
    assert!(all.as_array().unwrap().iter().any(|v| v["name"] == "ws"), "{all}");
    assert_eq!(up.sail(&["volume", "rm", "ws"]).ok(), "deleted cli-tests/ws\n");
    let gone = up.sail(&["--json", "volume", "cat", "ws", "in/single.txt"]);
    gone.fails(2);
    assert_eq!(gone.json_error().0, "VolumeNotFoundError");
}

#[test]
fn user_errors_exit_2_with_one_error_line() {
    let up = Up::start();
    up.sail(&["volume", "create", "e"]).ok();

    // Unknown volume, unknown path, bad name: exit 2, one `error:` line naming the problem.
    let r = up.sail(&["volume", "cat", "nope", "x"]);
    let err = r.fails(2);
    assert!(err.lines().any(|l| l.starts_with("error: ") && l.contains("nope")), "{err}");
    let r = up.sail(&["--json", "volume", "cat", "e", "missing.txt"]);
    r.fails(2);
    assert_eq!(r.json_error().0, "VolumePathNotFoundError");
    let r = up.sail(&["--json", "volume", "create", "bad/name"]);
    r.fails(2);
    assert_eq!(r.json_error().0, "VolumeInvalidArgumentError");
    // A conflict: a file put under a path that is a file in the head.
    let f = up.path("f.txt");
    write_file(&f, b"f\n");
    up.sail(&["volume", "put", "e", f.to_str().unwrap()]).ok();
    let r = up.sail(&["--json", "volume", "put", "e", f.to_str().unwrap(), "--dest", "f.txt"]);
    r.fails(2);
    assert_eq!(r.json_error().0, "VolumeCommitConflictError");
    let r = up.sail(&["volume", "put", "e", f.to_str().unwrap(), "--dest", "f.txt"]);
    assert!(r.fails(2).lines().any(|l| l.starts_with("error: ") && l.contains("f.txt")), "{}", r.stderr);
    // A local path that does not exist is the caller's mistake too.
    let r = up.sail(&["volume", "put", "e", "/nonexistent/file"]);
    assert!(r.fails(2).contains("/nonexistent/file"), "{}", r.stderr);
    // Mount commands on a path no helper serves.
    let plain = up.path("plain");
    std::fs::create_dir_all(&plain).unwrap();
    let r = up.sail(&["--json", "volume", "status", plain.to_str().unwrap()]);
    r.fails(2);
    assert_eq!(r.json_error().0, "VolumeFuseUnavailableError");
    // Bad arguments (clap): exit 2.
    up.sail(&["volume", "log", "e", "--limit", "many"]).fails(2);
    up.sail(&["volume", "frobnicate"]).fails(2);
}

#[test]
fn service_not_running_says_what_to_run() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    for args in [&["volume", "ls"][..], &["box", "ls"][..]] {
        let r = sail_with(&[("SAIL_ENDPOINT", &endpoint)], args, None);
        let err = r.fails(1);
        assert!(err.contains(&endpoint) && err.contains("sail up"), "sail {args:?}: {err}");
        let r = sail_with(&[("SAIL_ENDPOINT", &endpoint)], &[&["--json"][..], args].concat(), None);
        r.fails(1);
        assert_eq!(r.json_error().0, "SailError");
    }
}

/// The mount's own flags: --create mints the volume, --overlay-dir, --memory-cache-mib,
/// --threads and --no-passthrough are taken (status shows passthrough off), --foreground
/// serves until unmounted; --org scopes volumes.
#[test]
fn mount_flags() {
    let up = Up::start();
    let mnt = up.path("fresh");
    std::fs::create_dir_all(&mnt).unwrap();
    let overlay = up.path("overlay");
    let (m, o) = (mnt.to_str().unwrap(), overlay.to_str().unwrap());
    let args = [
        "volume",
        "mount",
        "minted",
        m,
        "--create",
        "--overlay-dir",
        o,
        "--memory-cache-mib",
        "64",
        "--threads",
        "2",
        "--no-passthrough",
    ];
    up.sail(&args).ok();
    let _unmount = Unmount(vec![mnt.clone()], up.endpoint.clone());
    // The helper makes the overlay directory it was given (its files are O_TMPFILE: unnamed).
    assert!(overlay.is_dir(), "--overlay-dir was not taken");
    std::fs::write(mnt.join("x.txt"), b"x\n").unwrap();
    let st = up.sail(&["--json", "volume", "status", m]).json();
    assert_eq!(st["passthrough"], false, "{st}");
    assert_eq!(st["volume"], "minted", "{st}");
    up.sail(&["volume", "commit", m]).ok();
    up.sail(&["volume", "unmount", m]).ok();
    assert_eq!(up.sail(&["volume", "cat", "minted", "x.txt"]).ok(), "x\n");
    // Without --create an unknown volume is not found (exit 2) and nothing stays mounted.
    let r = up.sail(&["volume", "mount", "never-made", m]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // --org: a key of org cli-tests cannot name another org (exit 2, the contract's name);
    // an operator key can, and the same name in another org is another volume.
    let refused = up.sail(&["--org", "other-org", "--json", "volume", "ls"]);
    refused.fails(2);
    assert_eq!(refused.json_error().0, "SailPermissionDeniedError");
    let env = [("SAIL_ENDPOINT", up.endpoint.as_str()), ("SAIL_API_KEY", up.operator_key.as_str())];
    let other = sail_with(&env, &["--org", "other-org", "--json", "volume", "ls"], None).json();
    assert_eq!(other, serde_json::json!([]));
    // Without a key the CLI says so (exit 2); `sail key whoami` names the key's org.
    let anonymous =
        sail_with(&[("SAIL_ENDPOINT", &up.endpoint), ("SAIL_CONFIG_DIR", "/nonexistent")], &["--json", "volume", "ls"], None);
    anonymous.fails(2);
    assert_eq!(anonymous.json_error().0, "SailAuthenticationError");
    assert!(up.sail(&["key", "whoami"]).ok().contains("admin of org cli-tests"));
    // --foreground serves in this process until unmounted.
    let mut fg = std::process::Command::new(common::SAIL)
        .args(["--endpoint", &up.endpoint, "volume", "mount", "--foreground", "minted", m])
        .env("SAIL_API_KEY", &up.key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let served = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::fs::read(mnt.join("x.txt")).map(|b| b == b"x\n").unwrap_or(false)
    });
    assert!(served, "the foreground mount never served x.txt");
    up.sail(&["volume", "unmount", m]).ok();
    let status = fg.wait().unwrap();
    assert!(status.success(), "the foreground helper exits 0 after unmount: {status}");
}

#[test]
fn mount_commit_reload_status_unmount() {
    let up = Up::start();
    up.sail(&["volume", "create", "m"]).ok();
    let a = up.path("a");
    let b = up.path("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (a_s, b_s) = (a.to_str().unwrap(), b.to_str().unwrap());
    let cache = up.path("cache");
    let cache = cache.to_str().unwrap();
    up.sail(&["--cache-dir", cache, "volume", "mount", "m", a_s]).ok();
    up.sail(&["--cache-dir", cache, "volume", "mount", "m", b_s]).ok();
    let _unmount = Unmount(vec![a.clone(), b.clone()], up.endpoint.clone());

    std::fs::write(a.join("hello.txt"), b"hi\n").unwrap();
    let st = up.sail(&["--json", "volume", "status", a_s]).json();
    assert!(st.get("head").is_some(), "{st}");
    let out = up.sail(&["volume", "commit", a_s]).ok();
    assert!(out.starts_with("committed #1 "), "{out}");
    std::fs::write(a.join("second.txt"), b"2\n").unwrap();
    let c = up.sail(&["--json", "volume", "commit", a_s]).json();
    let id = c["commit"].as_str().unwrap().to_owned();
    assert!(is_hex_id(&id), "{c}");
    assert_eq!(c["seq"], 2, "{c}");
    let nothing = up.sail(&["volume", "commit", a_s]).ok();
    assert!(nothing.starts_with("nothing to commit; head "), "{nothing}");
    let r = up.sail(&["--json", "volume", "reload", b_s]).json();
    assert_eq!(r["commit"].as_str(), Some(id.as_str()), "reload reports the new head: {r}");
    assert!(up.sail(&["volume", "reload", b_s]).ok().starts_with("reloaded to "));
    assert_eq!(std::fs::read(b.join("hello.txt")).unwrap(), b"hi\n");
    up.sail(&["volume", "unmount", a_s]).ok();
    up.sail(&["volume", "unmount", b_s]).ok();
    let r = up.sail(&["volume", "commit", a_s]);
    assert!(r.fails(2).contains("VolumeFuseUnavailableError") || r.stderr.contains("no FUSE helper"), "{}", r.stderr);
}

struct Unmount(Vec<std::path::PathBuf>, String);

impl Drop for Unmount {
    fn drop(&mut self) {
        for m in &self.0 {
            let _ = sail_with(&[("SAIL_ENDPOINT", &self.1)], &["volume", "unmount", m.to_str().unwrap_or("")], None);
        }
    }
}

/// Every command of docs/cli.md answers `--help` with an example.
#[test]
fn help_on_every_command_has_an_example() {
    let commands: &[&[&str]] = &[
        &[],
        &["up"],
        &["doctor"],
        &["completions"],
        &["volume"],
        &["volume", "create"],
        &["volume", "ls"],
        &["volume", "rm"],
        &["volume", "log"],
        &["volume", "put"],
        &["volume", "list"],
        &["volume", "cat"],
        &["volume", "mount"],
        &["volume", "commit"],
        &["volume", "reload"],
        &["volume", "status"],
        &["volume", "unmount"],
        &["box"],
        &["box", "create"],
        &["box", "ls"],
        &["box", "info"],
        &["box", "listeners"],
        &["box", "exec"],
        &["box", "wait"],
        &["box", "write"],
        &["box", "read"],
        &["box", "terminate"],
        &["box", "checkpoint"],
        &["box", "pause"],
        &["box", "resume"],
        &["box", "sleep"],
        &["box", "complete-call"],
        &["box", "fork"],
        &["box", "restore"],
        &["box", "upgrade"],
    ];
    for c in commands {
        let args = [*c, &["--help"][..]].concat();
        let out = sail_with(&[], &args, None).ok();
        assert!(out.contains("Example"), "sail {} --help has no example:\n{out}", c.join(" "));
    }
}

#[test]
fn shell_completions() {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef sail"), ("fish", "complete -c sail")] {
        let out = sail_with(&[], &["completions", shell], None).ok();
        assert!(out.contains(marker), "{shell} completions lack {marker:?}");
        assert!(out.contains("checkpoint"), "{shell} completions lack subcommands");
    }
    sail_with(&[], &["completions", "tcsh"], None).fails(2);
}

#[test]
fn quiet_prints_only_results() {
    let up = Up::start();
    let file = up.path("q.txt");
    write_file(&file, b"q\n");
    up.sail(&["volume", "create", "q"]).ok();
    let r = up.sail(&["--quiet", "volume", "put", "q", file.to_str().unwrap()]);
    let id = r.ok();
    assert!(is_hex_id(id.trim()) && id.lines().count() == 1, "--quiet put prints the commit id alone: {id:?}");
    assert_eq!(r.stderr, "", "--quiet put prints nothing on stderr");
    // Confirmations print nothing.
    assert_eq!(up.sail(&["-q", "volume", "create", "q2"]).ok(), "");
    assert_eq!(up.sail(&["-q", "volume", "rm", "q2"]).ok(), "");
    // Results that are the point of the command still print.
    assert_eq!(up.sail(&["--quiet", "volume", "cat", "q", "q.txt"]).ok(), "q\n");
}
