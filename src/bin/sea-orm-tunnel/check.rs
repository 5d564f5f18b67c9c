//! `sea-orm-tunnel check`: prints the steps of [`diagnose`] as they finish, then a verdict.

use std::process::ExitCode;
use std::time::Duration;

use sea_orm_tunnel::config::Config;
use sea_orm_tunnel::tunnel::diagnose::{Diagnosis, Outcome, Route, Step, StepKind, diagnose_with};

use crate::EXIT_CONFIG;

/// Runs `check`; returns the process exit code (0, 10 + the failed step, or 1 for configuration).
pub(crate) async fn run() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    println!("sea-orm-tunnel check");
    println!("  database  {}", config.redacted_database_url());
    match &config.tunnel {
        Some(t) => {
            println!(
                "  bastion   {}@{}:{} (host key policy {}, known_hosts {})",
                t.user,
                t.host,
                t.port,
                t.host_key_policy,
                t.known_hosts.display()
            );
            println!("  remote    {} (as seen from the bastion)", t.remote_target());
        }
        None => println!("  tunnel    none (SSH_HOST is not set): connecting directly"),
    }
    println!();
    match diagnose_with(&config, |step| println!("{}", step_line(step))).await {
        Ok(diagnosis) => verdict(&diagnosis),
        Err(e) => config_error(&e),
    }
}

fn config_error(e: &sea_orm_tunnel::Error) -> ExitCode {
    println!("error: {e}");
    println!("verdict: FAILED: configuration");
    ExitCode::from(EXIT_CONFIG)
}

/// `  [3/7] host key        ok                 verified (...)`.
fn step_line(step: &Step) -> String {
    // The place in the run order (the TLS step runs sixth, though its number is 8).
    let n = step.kind.position();
    let total = StepKind::ALL.len();
    let name = step.kind.name();
    let time = step.elapsed.map(millis).unwrap_or_default();
    match step.outcome {
        Outcome::Ok => format!("  [{n}/{total}] {name:<15} ok      {time:>9}  {}", step.detail),
        Outcome::Failed => format!("  [{n}/{total}] {name:<15} FAILED  {time:>9}  {}", step.detail),
        Outcome::Skipped => format!("  [{n}/{total}] {name:<15} skipped {time:>9}  {}", step.detail),
        Outcome::NotRun => format!("  [{n}/{total}] {name:<15} not run"),
        // A newer library's outcome: print it plainly.
        other => format!("  [{n}/{total}] {name:<15} {other:?} {time:>9}  {}", step.detail),
    }
}

fn millis(t: Duration) -> String {
    format!("{:.1} ms", t.as_secs_f64() * 1e3)
}

/// Prints the verdict; returns the exit code.
fn verdict(diagnosis: &Diagnosis) -> ExitCode {
    println!();
    match diagnosis.failure() {
        Some(failed) => {
            println!(
                "verdict: FAILED at step {} ({})",
                failed.kind.position(),
                failed.kind.name()
            );
            if let Some(hint) = &failed.hint {
                println!("hint: {hint}");
            }
        }
        None => {
            let through = match diagnosis.route {
                Route::Direct => "directly",
                _ => "through the tunnel",
            };
            println!(
                "verdict: OK: PostgreSQL answers {through} (total {})",
                millis(diagnosis.total)
            );
        }
    }
    ExitCode::from(diagnosis.exit_code())
}
