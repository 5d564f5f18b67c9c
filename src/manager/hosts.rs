//! Several database hosts and `target_session_attrs`: which server takes new connections.
//!
//! With a multi-host `DATABASE_URL` (`postgres://a:5432,b:5432/db`, `?host=a,b`) each host is
//! one place the pool can dial: through the tunnel, the local endpoint the tunnel forwards to
//! that host (the bastion dials it); directly, the host itself. The hosts are tried in order
//! with one-off connections (never the pool's), and the first that satisfies
//! `target_session_attrs` becomes the pool's target: both pools' connect options are pointed at
//! it (sqlx reads them again on every connect attempt, so an acquire waiting on a refused
//! connection lands on the new server). `prefer-standby` tries for a standby first, then any.
//!
//! What keeps the pool on a qualifying server afterwards:
//! - every new connection reads its server's role in the round trip that sets it up, and is
//!   refused when it does not qualify (sqlx then retries the connect within `acquire_timeout`);
//! - the idle ping and the health check read the role too; a pooled connection whose server
//!   stopped qualifying (a demoted primary) retires the whole pool generation;
//! - each of those, a failover signal (25006, a burst of 57P0x / 08xxx) and a failed health
//!   check asks for a new selection, which runs in its own task, one at a time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sea_orm::sqlx;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection as _, Row as _};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::config::{ServerRole, TargetSessionAttrs};
use crate::error::{Error, Result};
use crate::observe::events;

/// The shortest time between two selections.
const SELECTION_PAUSE: Duration = Duration::from_millis(250);

/// Where the pool dials one host.
#[derive(Debug, Clone)]
pub(crate) enum Dial {
    /// A TCP host and port (the host itself, or the tunnel's loopback endpoint for it).
    Tcp(String, u16),
    /// The tunnel's Unix socket directory for it, and the port naming the socket file.
    Socket(std::path::PathBuf, u16),
}

#[derive(Debug, Clone)]
pub(crate) struct Host {
    /// `host:port` as `DATABASE_URL` names it (how logs and errors name it).
    pub(crate) name: String,
    pub(crate) dial: Dial,
}

#[derive(Debug)]
pub(crate) struct Hosts {
    attrs: TargetSessionAttrs,
    hosts: Vec<Host>,
    /// The host new connections go to.
    current: AtomicUsize,
    /// Something asks for a selection now.
    pub(crate) wanted: Notify,
    /// One selection at a time.
    selecting: tokio::sync::Mutex<()>,
}

impl Hosts {
    /// `None` when there is nothing to choose or check: one host and `any`.
    pub(crate) fn new(attrs: TargetSessionAttrs, hosts: Vec<Host>) -> Option<Arc<Hosts>> {
        if hosts.is_empty() || (hosts.len() == 1 && !attrs.checks_role()) {
            return None;
        }
        Some(Arc::new(Hosts {
            attrs,
            hosts,
            current: AtomicUsize::new(0),
            wanted: Notify::new(),
            selecting: tokio::sync::Mutex::new(()),
        }))
    }

    /// Whether the role of a server must be read (otherwise only reachability matters).
    pub(crate) fn checks_role(&self) -> bool {
        self.attrs.checks_role()
    }

    pub(crate) fn current_name(&self) -> &str {
        &self.hosts[self.current.load(Ordering::SeqCst)].name
    }

    /// Whether a server in `role` may hold the pool's connections.
    pub(crate) fn accepts(&self, role: ServerRole) -> bool {
        self.attrs.accepts(role)
    }

    /// Why a server in `role` may not (for errors and logs).
    pub(crate) fn refusal(&self, role: ServerRole) -> String {
        format!(
            "{} is {}, not {} (target_session_attrs)",
            self.current_name(),
            role.describe(),
            self.attrs
        )
    }

    /// `options` pointed at host `i`.
    pub(crate) fn point(&self, options: PgConnectOptions, i: usize) -> PgConnectOptions {
        match &self.hosts[i].dial {
            Dial::Tcp(host, port) => options.host(host).port(*port),
            Dial::Socket(dir, port) => options.socket(dir).port(*port),
        }
    }

    /// Tries the hosts in order and returns the first that qualifies (for `prefer-standby`:
    /// the first standby, else the first that answers), with its role.
    async fn find(&self, base: &PgConnectOptions, timeout: Duration) -> Result<(usize, Option<ServerRole>)> {
        let mut tried = Vec::with_capacity(self.hosts.len());
        let mut fallback = None;
        for i in 0..self.hosts.len() {
            let name = self.hosts[i].name.clone();
            match probe(self.point(base.clone(), i), timeout, self.checks_role()).await {
                Ok(role) => {
                    let qualifies = match (self.attrs, role) {
                        (_, None) => true,
                        (TargetSessionAttrs::PreferStandby, Some(role)) => {
                            if role.in_recovery {
                                true
                            } else {
                                fallback.get_or_insert((i, Some(role)));
                                false
                            }
                        }
                        (attrs, Some(role)) => attrs.accepts(role),
                    };
                    if qualifies {
                        return Ok((i, role));
                    }
                    tried.push((name, role.map_or("unsuitable", ServerRole::describe).to_owned()));
                }
                Err(why) => tried.push((name, why)),
            }
        }
        match fallback {
            Some(found) => Ok(found),
            None => Err(Error::NoSuitableHost {
                target_session_attrs: self.attrs,
                tried,
            }),
        }
    }
}

/// A one-off connection to one host: its role (when asked for), or why it failed.
async fn probe(
    options: PgConnectOptions,
    timeout: Duration,
    read_role: bool,
) -> std::result::Result<Option<ServerRole>, String> {
    let attempt = async {
        let mut conn = PgConnection::connect_with(&options).await?;
        let role = if read_role { Some(read(&mut conn).await?) } else { None };
        let _ = conn.close().await;
        Ok::<_, sqlx::Error>(role)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(role)) => Ok(role),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Reads a connection's server role (simple protocol: works through any pooler, one round trip).
pub(crate) async fn read(conn: &mut PgConnection) -> std::result::Result<ServerRole, sqlx::Error> {
    read_from(conn, ServerRole::QUERY).await
}

/// [`read`] with `sql`, whose first two columns are [`ServerRole::QUERY`]'s.
pub(crate) async fn read_from(conn: &mut PgConnection, sql: &str) -> std::result::Result<ServerRole, sqlx::Error> {
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(conn)
        .await?;
    Ok(ServerRole {
        in_recovery: row.try_get(0)?,
        read_only: row.try_get(1)?,
    })
}

impl Inner {
    /// Selects the host new connections go to and points both pools at it. Returns the error
    /// when none qualifies (the pools stay where they were).
    pub(crate) async fn select_host(&self, hosts: &Hosts, first: bool) -> Result<()> {
        let _one = hosts.selecting.lock().await;
        let pool = self.db.get_postgres_connection_pool();
        let base = pool.connect_options().as_ref().clone();
        let (found, role) = hosts.find(&base, self.config.pool.connect_timeout).await?;
        let previous = hosts.current.swap(found, Ordering::SeqCst);
        let label = self.hooks.pool_label();
        let role = role.map_or("reachable", ServerRole::describe);
        if first || found != previous {
            for db in std::iter::once(&self.db).chain(self.sink_db.as_ref()) {
                let pool = db.get_postgres_connection_pool();
                let options = hosts.point(pool.connect_options().as_ref().clone(), found);
                pool.set_connect_options(options);
            }
        }
        if first {
            events::database_host_selected(label, &hosts.hosts[found].name, role, None, hosts.attrs.as_str());
        } else if found != previous {
            events::database_host_selected(
                label,
                &hosts.hosts[found].name,
                role,
                Some(&hosts.hosts[previous].name),
                hosts.attrs.as_str(),
            );
            // Connections to the previous host go: the whole generation.
            self.failover.signal("the database host changed (target_session_attrs)");
        }
        Ok(())
    }
}

/// Runs a selection whenever one is asked for (a refused new connection, a failed or
/// wrong-role health check or idle ping, a failover signal). Holds only a `Weak`.
pub(crate) async fn run(inner: Weak<Inner>, hosts: Arc<Hosts>, cancel: CancellationToken) {
    let Some(moved) = inner.upgrade().map(|i| i.failover.clone()) else {
        return;
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = hosts.wanted.notified() => {}
            () = moved.moved.notified() => {}
        }
        let Some(manager) = inner.upgrade() else { return };
        let outcome = tokio::select! {
            () = cancel.cancelled() => return,
            r = manager.select_host(&hosts, false) => r,
        };
        drop(manager);
        if let Err(e) = &outcome {
            tracing::warn!(target: crate::observe::events::TARGET_MANAGER, error = %e, "no database host qualifies yet");
        }
        // Every failing query asks again: at most one selection per pause, and a failed one is
        // tried again after a longer one even if nothing asks (the hosts may be mid-failover).
        let pause = if outcome.is_ok() {
            SELECTION_PAUSE
        } else {
            SELECTION_PAUSE * 4
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        if outcome.is_err() {
            hosts.wanted.notify_one();
        }
    }
}
