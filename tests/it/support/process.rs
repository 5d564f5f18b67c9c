//! Tests that need a process of their own.
//!
//! All integration tests are one binary. nextest runs each test in its own process, but
//! `cargo test` runs them as threads of one process, where a test that installs a global
//! subscriber or `log` logger, or counts the process's file descriptors, would collide with the
//! others. Such a test starts with [`run_alone`].

use std::process::Command;

/// Set in the child that [`run_alone`] starts.
const ALONE: &str = "SEA_ORM_TUNNEL_TEST_ALONE";

/// The path of test `name` in module `module` (its `module_path!()`), as the test harness
/// filters by it.
pub fn test_path(module: &str, name: &str) -> String {
    let module = module.split_once("::").map_or("", |(_crate, rest)| rest);
    if module.is_empty() {
        name.to_owned()
    } else {
        format!("{module}::{name}")
    }
}

/// Whether this process runs only the current test: under nextest (one process per test), or in
/// the child [`run_alone`] started.
pub fn alone_in_process() -> bool {
    std::env::var_os(ALONE).is_some()
        || std::env::var_os("NEXTEST_EXECUTION_MODE").is_some_and(|m| m == "process-per-test")
}

/// Unless this process runs only the current test, runs test `name` of `module` (pass
/// `module_path!()`) in a child process of this binary and checks that it passed; returns `true`
/// then, and the caller returns at once. Returns `false` where the caller should run the test
/// itself.
pub fn run_alone(module: &str, name: &str) -> bool {
    if alone_in_process() {
        return false;
    }
    let path = test_path(module, name);
    let output = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", &path, "--nocapture", "--test-threads=1"])
        .env(ALONE, "1")
        .output()
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    assert!(output.status.success(), "{path} failed in its own process");
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{path} did not run in its own process"
    );
    true
}
