//! `sail box ...` as docs/cli.md writes it, against a real `sail up` booting one real VM
//! (the busybox `minimal` image under QEMU; TCG here), shared by every step.

mod common;

use common::Up;

/// Runs when the VM kit is installed (scripts/setup.sh vm, scripts/build-agent.sh); the
/// README's test command installs both.
fn vm_ready() -> bool {
    let guest = std::env::var_os("SAIL_GUEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sail/guest"));
    guest.exists() && std::env::var_os("SAIL_AGENT_BIN").is_some()
}

#[test]
fn sailbox_commands_as_documented() {
    if !vm_ready() {
        panic!("the VM kit is missing: run `bash scripts/setup.sh vm && bash scripts/build-agent.sh` and set SAIL_AGENT_BIN");
    }
    let up = Up::start();
    bad_arguments(&up);
    let id = up.sail(&["box", "create", "--image", "minimal", "--port", "8080", "--name", "t"]).ok().trim().to_owned();
    assert!(!id.is_empty() && !id.contains(' '), "create prints the id: {id:?}");
    let _end = Terminate(&up, id.clone());

    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    exec(&up, &id);
    files(&up, &id, &data);
    detach_and_background(&up, &id);
    info_ls_listeners(&up, &id);
    checkpoint_fork_restore(&up, &id, &data);
    sleep_pause_upgrade_doctor(&up, &id, &data);
    terminate(&up, &id);
}

/// Out-of-range arguments fail before anything is created.
fn bad_arguments(up: &Up) {
    let r = up.sail(&["--json", "box", "create", "--image", "minimal", "--memory-mib", "10"]);
    r.fails(2);
    assert_eq!(r.json_error().0, "SailboxCreationError");
    let r = up.sail(&["box", "create", "--image", "minimal", "--port", "22"]);
    assert!(r.fails(2).starts_with("error: "), "{}", r.stderr);
    let r = up.sail(&["box", "create", "--image", "minimal", "--network", "host"]);
    assert!(r.fails(2).contains("host"), "{}", r.stderr);
    assert_eq!(up.sail(&["--json", "box", "ls"]).json(), serde_json::json!([]));
}

/// `box exec`: quoting, exit codes, --cwd, --timeout, --json.
fn exec(up: &Up, id: &str) {
    // The words after `--` reach the program as given.
    assert_eq!(up.sail(&["box", "exec", id, "--", "sh", "-c", "echo hi"]).ok(), "hi\n");
    assert_eq!(
        up.sail(&["box", "exec", id, "--", "printf", "%s|", "a", "b c", "it's", "$HOME", "*"]).ok(),
        "a|b c|it's|$HOME|*|"
    );
    // One argument after `--` is a shell command line.
    assert_eq!(up.sail(&["box", "exec", id, "--", "echo one && echo two"]).ok(), "one\ntwo\n");
    // Exit codes pass through; --cwd applies.
    assert_eq!(up.sail(&["box", "exec", id, "--", "sh", "-c", "exit 3"]).code, 3);
    assert_eq!(up.sail(&["box", "exec", id, "--cwd", "/tmp", "--", "pwd"]).ok(), "/tmp\n");

    // --timeout kills the command: exit 124 and a note on stderr.
    let r = up.sail(&["box", "exec", "--timeout", "1", id, "--", "sleep", "30"]);
    assert_eq!(r.code, 124, "{}", r.stderr);
    assert!(r.stderr.contains("timed out"), "{}", r.stderr);
    // --json: the result object.
    let j = up.sail(&["--json", "box", "exec", id, "--", "sh", "-c", "echo out; echo err >&2; exit 5"]);
    assert_eq!(j.code, 5);
    let v: serde_json::Value = serde_json::from_str(j.out().trim()).expect("exec --json prints one object");
    assert_eq!((v["stdout"].as_str(), v["stderr"].as_str(), v["return_code"].as_i64()), (Some("out\n"), Some("err\n"), Some(5)));
}

/// `box write` / `box read`.
fn files(up: &Up, id: &str, data: &[u8]) {
    // write / read, with a space in the path.
    up.sail_in(&["box", "write", id, "/srv/a b/data.bin"], Some(data)).ok();
    assert_eq!(up.sail(&["box", "read", id, "/srv/a b/data.bin"]).stdout, data);
    assert_eq!(up.sail(&["box", "exec", id, "--", "ls", "/srv/a b"]).ok(), "data.bin\n");
    up.sail_in(&["box", "write", "--mode", "600", id, "/srv/secret"], Some(b"s")).ok();
    assert_eq!(up.sail(&["box", "exec", id, "--", "stat", "-c", "%a", "/srv/secret"]).ok(), "600\n");
    let r = up.sail(&["box", "read", id, "/srv/missing"]);
    assert_eq!(r.code, 2, "reading a missing file is a user error: {}", r.stderr);
}

/// `box exec --detach` + `box wait`, `box exec --background`.
fn detach_and_background(up: &Up, id: &str) {
    // --detach prints an exec id; wait picks it up; an unknown id is not found.
    let exec_id = up.sail(&["box", "exec", "--detach", id, "--", "sh", "-c", "sleep 1; echo later"]).ok().trim().to_owned();
    assert!(!exec_id.is_empty());
    assert_eq!(up.sail(&["box", "wait", &exec_id]).ok(), "later\n");
    let r = up.sail(&["--json", "box", "wait", "no-such-exec"]);
    r.fails(2);
    assert_eq!(r.json_error().0, "SailboxExecRequestNotFoundError");

    // --background: the launcher returns, the server keeps running.
    up.sail(&["box", "exec", "--background", id, "--", "sh", "-c", "while true; do echo up > /tmp/bg; sleep 1; done"]).ok();
    let seen = (0..30).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(500));
        up.sail(&["box", "exec", id, "--", "cat", "/tmp/bg"]).out() == "up\n"
    });
    assert!(seen, "the background loop never wrote /tmp/bg");
}

/// `box info`, `box ls` and its filters, `box listeners`.
fn info_ls_listeners(up: &Up, id: &str) {
    // info / ls / listeners.
    let info = up.sail(&["--json", "box", "info", id]).json();
    assert_eq!((&info["sailbox_id"], &info["network"]), (&serde_json::json!(id), &serde_json::json!("outbound")));
    let text = up.sail(&["box", "info", id]).ok();
    assert!(text.starts_with(id) && text.contains("network outbound"), "{text}");
    let ls = up.sail(&["--json", "box", "ls"]).json();
    assert_eq!(ls.as_array().map(Vec::len), Some(1), "{ls}");
    let l = up.sail(&["box", "listeners", id]).ok();
    assert!(l.starts_with("port 8080 "), "{l}");
    // Nothing listens on 8080 in the guest: --wait gives up with exit 1.
    let r = up.sail(&["box", "listeners", id, "--port", "8080", "--wait", "1"]);
    assert_eq!(r.code, 1, "{}", r.stdout.len());
    assert!(r.out().contains("not routed yet"), "{}", r.out());
    // ls filters: --app, --all.
    assert_eq!(up.sail(&["--json", "box", "ls", "--app", "no-such-app"]).json(), serde_json::json!([]));
    assert_eq!(up.sail(&["--json", "box", "ls", "--app", "default"]).json().as_array().map(Vec::len), Some(1));
}

/// `box checkpoint`, `box fork`, `box restore`.
fn checkpoint_fork_restore(up: &Up, id: &str, data: &[u8]) {
    // checkpoint prints its id.
    let ck = up.sail(&["box", "checkpoint", id]).ok().trim().to_owned();
    assert!(ck.starts_with("ck-"), "{ck}");

    // fork prints the child's id; the child has the parent's files.
    let child = up.sail(&["box", "fork", id]).ok().trim().to_owned();
    let _end_child = Terminate(up, child.clone());
    assert!(!child.is_empty() && child != id, "{child}");
    assert_eq!(up.sail(&["box", "read", &child, "/srv/a b/data.bin"]).stdout, data);
    up.sail(&["box", "terminate", &child]).ok();

    // restore: a new sailbox from the checkpoint, with the files it held.
    let restored = up.sail(&["box", "restore", &ck, "--name", "r"]).ok().trim().to_owned();
    let _end_restored = Terminate(up, restored.clone());
    assert_eq!(up.sail(&["box", "exec", &restored, "--", "ls", "/srv/a b"]).ok(), "data.bin\n");
    up.sail(&["box", "terminate", &restored]).ok();
}

/// `box sleep`/`complete-call`, `pause`/`resume`, `info --connect`, `ls
/// --max-guest-schema-version`, `upgrade`, `doctor`.
fn sleep_pause_upgrade_doctor(up: &Up, id: &str, data: &[u8]) {
    // sleep --call: completing another call is refused (exit 2); the right one wakes it.
    assert_eq!(up.sail(&["--json", "box", "sleep", id, "--call", "llm-1"]).json()["state"], "sleeping");
    up.sail(&["box", "complete-call", id, "other"]).fails(2);
    assert_eq!(up.sail(&["--json", "box", "complete-call", id, "llm-1"]).json()["state"], "running");

    // pause: exec fails with the execution error; resume runs it again.
    assert_eq!(up.sail(&["--json", "box", "pause", id]).json()["state"], "paused");
    let r = up.sail(&["--json", "box", "exec", id, "--", "true"]);
    assert_ne!(r.code, 0, "exec on a paused sailbox: {}", r.stderr);
    assert_eq!(r.json_error().0, "SailboxExecutionError");
    assert_eq!(up.sail(&["--json", "box", "resume", id]).json()["state"], "running");
    // info --connect on a running sailbox: it stays running; ls by agent schema.
    let info = up.sail(&["--json", "box", "info", "--connect", id]).json();
    assert_eq!(info["state"], "running", "{info}");
    let schema = info["guest_schema_version"].as_u64().expect("guest_schema_version");
    let v = schema.to_string();
    let listed = up.sail(&["--json", "box", "ls", "--max-guest-schema-version", &v]).json();
    assert!(listed.as_array().is_some_and(|a| a.iter().any(|s| s["sailbox_id"] == id)), "{listed}");
    assert_eq!(up.sail(&["box", "exec", id, "--", "cat", "/srv/a b/data.bin"]).stdout, data);

    // upgrade: the agent is current, so it applies at once.
    assert_eq!(up.sail(&["--json", "box", "upgrade", id]).json()["applied"], true);

    // doctor: every row present, as JSON.
    let d = up.sail(&["--json", "doctor"]).json();
    for key in ["accelerator", "qemu", "guest kernel", "agent", "passt", "iproute2", "service"] {
        assert_eq!(d[key]["ok"], true, "doctor {key}: {d}");
    }
}

/// `box terminate`, then what a terminated or unknown id gets.
fn terminate(up: &Up, id: &str) {
    // terminate; then the id is terminated.
    up.sail(&["box", "terminate", id]).ok();
    let r = up.sail(&["--json", "box", "exec", id, "--", "true"]);
    r.fails(2);
    assert_eq!(r.json_error().0, "SailboxTerminatedError");
    let r = up.sail(&["box", "info", "sb-unknown"]);
    assert!(r.fails(2).starts_with("error: "), "{}", r.stderr);
    // A terminated sailbox is listed only with --all.
    assert_eq!(up.sail(&["--json", "box", "ls"]).json(), serde_json::json!([]));
    let all = up.sail(&["--json", "box", "ls", "--all"]).json();
    assert!(all.as_array().is_some_and(|a| a.iter().any(|s| s["sailbox_id"] == id && s["state"] == "terminated")), "{all}");
}

struct Terminate<'a>(&'a Up, String);

impl Drop for Terminate<'_> {
    fn drop(&mut self) {
        let _ = self.0.sail(&["box", "terminate", &self.1]);
    }
}
