//! Failover awareness: errors that mean "the database moved" retire the pool generation.
//!
//! A managed database that fails over (RDS Multi-AZ, Patroni, a promoted standby) leaves a pool
//! pinned to the old primary: its connections answer `cannot execute INSERT in a read-only
//! transaction` (SQLSTATE 25006) once it is demoted, or die together (57P01–57P03, class 08).
//! New connections go where the database's name points now (behind a bastion, each channel
//! resolves it on the bastion), so what is needed is to stop handing out the old ones.
//!
//! Signals, wherever the manager sees an error (`manager.retry`, `begin`, `explain_error`, the
//! health check, and any `?` on a [`DbErr`](sea_orm::DbErr) inside a request served through
//! [`InjectDatabaseLayer`](crate::layer::InjectDatabaseLayer)):
//! - 25006 while the pool's session is not read-only: [`Error::Failover`] (transient, so
//!   `manager.retry` and the recovery layer retry it) and a signal;
//! - 57P01–57P03 / class 08 three times within two seconds: a signal (the errors are transient
//!   already).
//!
//! A signal retires the whole pool generation (every signal: a connection opened in the moment
//! between a retirement and the name moving must go too), and once per failover (later signals
//! within [`DEBOUNCE`] are the same one) counts `db_failovers_total`, logs a `database_failover`
//! event and asks the health loop for a check at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::DbErr;
use tokio::sync::Notify;

use crate::error::Error;
use crate::generation::Generation;
use crate::sync::lock;

/// Signals within this long of a retirement belong to the same failover.
pub(crate) const DEBOUNCE: Duration = Duration::from_secs(2);
/// Connection failures within this window make a burst ...
const BURST_WINDOW: Duration = Duration::from_secs(2);
/// ... of this many.
const BURST_COUNT: usize = 3;

pub(crate) struct Failover {
    generation: Arc<Generation>,
    /// The pool's own session is read-only: a 25006 is then the application's write, not a move.
    read_only_session: bool,
    pool_label: String,
    last_retired: Mutex<Option<Instant>>,
    burst: Mutex<VecDeque<Instant>>,
    /// The health loop waits on this for an immediate check.
    pub(crate) check_now: Notify,
    /// The host selection (several hosts, `target_session_attrs`) waits on this.
    pub(crate) moved: Notify,
    /// Several hosts / `target_session_attrs`: a connection failure asks for a selection (the
    /// current host may be gone while another serves).
    hosts: Option<Arc<super::hosts::Hosts>>,
    /// Its spare channels were connected where the name pointed before: discarded on a signal.
    tunnel: Option<crate::SshTunnel>,
}

tokio::task_local! {
    static IN_SCOPE: Arc<Failover>;
}

impl Failover {
    pub(crate) fn new(
        generation: Arc<Generation>,
        read_only_session: bool,
        pool_label: String,
        hosts: Option<Arc<super::hosts::Hosts>>,
        tunnel: Option<crate::SshTunnel>,
    ) -> Failover {
        Failover {
            generation,
            read_only_session,
            pool_label,
            last_retired: Mutex::new(None),
            burst: Mutex::new(VecDeque::new()),
            check_now: Notify::new(),
            moved: Notify::new(),
            hosts,
            tunnel,
        }
    }

    /// Looks at `error` for a failover signal; returns the error a caller should act on.
    pub(crate) fn observe(&self, error: Error) -> Error {
        let Error::Database(db) = &error else { return error };
        let code = crate::error::sqlstate(db);
        if let Some(hosts) = &self.hosts
            && crate::error::db_err_is_transient(db)
            && code
                .as_deref()
                .is_none_or(|c| c.starts_with("08") || c.starts_with("57P0"))
        {
            // The server (or the path to it) failed: another host may serve now.
            hosts.wanted.notify_one();
        }
        let Some(code) = code else {
            return error;
        };
        if code == "25006" && !self.read_only_session {
            self.signal("read-only transaction (SQLSTATE 25006) on a read-write pool");
            let Error::Database(source) = error else {
                unreachable!("matched above")
            };
            return Error::Failover {
                signal: "the server is read-only (SQLSTATE 25006): it was demoted, the primary moved",
                source,
            };
        }
        if matches!(code.as_str(), "57P01" | "57P02" | "57P03") || code.starts_with("08") {
            let now = Instant::now();
            let burst = {
                let mut burst = lock(&self.burst);
                burst.push_back(now);
                while burst.front().is_some_and(|t| now.duration_since(*t) > BURST_WINDOW) {
                    burst.pop_front();
                }
                burst.len() >= BURST_COUNT
            };
            if burst {
                lock(&self.burst).clear();
                self.signal("a burst of server shutdowns / connection failures (57P0x, 08xxx)");
            }
        }
        error
    }

    /// Retires the generation (every time: a connection opened just after the last retirement,
    /// while the name still pointed at the old primary, must go too); counts, logs and asks for
    /// a check unless this failover already did.
    pub(crate) fn signal(&self, why: &str) {
        self.generation.retire_all();
        if let Some(tunnel) = &self.tunnel {
            tunnel.discard_spares();
        }
        {
            let mut last = lock(&self.last_retired);
            if last.is_some_and(|t| t.elapsed() < DEBOUNCE) {
                return;
            }
            *last = Some(Instant::now());
        }
        crate::observe::events::database_failover(&self.pool_label, why);
        self.check_now.notify_one();
        self.moved.notify_one();
    }

    /// Runs `fut` with this detector in scope: a [`DbErr`] converted into [`Error`] inside it is
    /// observed (see [`observe_in_scope`]).
    pub(crate) async fn scope<F: Future>(self: Arc<Self>, fut: F) -> F::Output {
        IN_SCOPE.scope(self, fut).await
    }
}

/// `From<DbErr> for Error`: observed by the detector of the request being served, if any.
pub(crate) fn observe_in_scope(error: DbErr) -> Error {
    match IN_SCOPE.try_with(Arc::clone) {
        Ok(detector) => detector.observe(Error::Database(error)),
        Err(_) => Error::Database(error),
    }
}

/// Whether a request scope's detector is active (so `From<DbErr>` observes errors).
pub(crate) fn in_scope() -> bool {
    IN_SCOPE.try_with(|_| ()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custom() -> Error {
        Error::Database(DbErr::Custom("not a server error".into()))
    }

    #[test]
    fn a_burst_retires_once_and_other_errors_never() {
        let generation = Arc::new(Generation::new());
        let f = Failover::new(generation.clone(), false, "default".into(), None, None);
        // Errors without a SQLSTATE are not signals.
        for _ in 0..10 {
            assert!(matches!(f.observe(custom()), Error::Database(_)));
        }
        assert_eq!(generation.bumps(), 0);
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            f.signal("test");
            f.signal("test again, same failover");
        });
        assert_eq!(generation.bumps(), 2, "every signal retires what was opened before it");
        let counted: u64 = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == crate::observe::metrics::DB_FAILOVERS_TOTAL)
            .map(|(.., value)| match value {
                metrics_util::debugging::DebugValue::Counter(n) => n,
                _ => 0,
            })
            .sum();
        assert_eq!(counted, 1, "one failover counted");
    }
}
