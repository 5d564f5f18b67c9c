//! Per-connection pool rules, connection ids, and checkout tracking for events, metrics and leak
//! detection.
//!
//! The rules read only sqlx's [`PoolConnectionMetadata`] (`age`, `idle_for`), so they hold
//! whatever the hooks remember: a connection created before the [`Generation`] cutoff is closed
//! instead of handed out or taken back; so is one older than `max_lifetime` minus up to 10 % (a
//! fraction drawn from its creation instant, so connections opened together do not expire
//! together); only one idle at least `test_if_idle_for` is pinged before use.
//!
//! Session settings are startup options (see `pool`), so `after_connect` sends one statement:
//! `SET application_name = '<prefix>-<tag>-<n>'`, `<tag>` random per hooks instance.
//!
//! Identity serves events and leak reports only. A `PgConnection` exposes none, so `after_connect`
//! records the instant it finished with the id; sqlx stamps the connection's creation right after
//! the hook returns, so later hooks take the latest record at or before `now - meta.age`. Two
//! setups finishing within microseconds may be mistaken for one another, and a connection not
//! found is named `<prefix>-<tag>-?`; neither costs a round trip or closes a connection.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sea_orm::sqlx;
use sea_orm::sqlx::pool::PoolConnectionMetadata;
use sea_orm::sqlx::postgres::{PgConnection, PgPool};

use super::Counters;
use crate::config::PoolConfig;
use crate::generation::Generation;
use crate::observe::events::{self, CheckoutOrigin};
use crate::observe::log_sink::{ConnectionLogEvent, LogSink};
use crate::observe::pool::PoolTelemetry;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Farthest a recorded setup instant may lie before `now - meta.age` and still name the
/// connection; farther means its record was pruned, and the id is reported as unknown.
const IDENTITY_WINDOW: Duration = Duration::from_secs(1);
/// Width of the creation-time buckets the lifetime jitter is drawn from: much wider than the
/// microseconds by which `now - meta.age` varies between two hooks of one connection.
const JITTER_BUCKET: Duration = Duration::from_millis(10);
/// Without a lifetime, records older than twice this are dropped (their connections, if still
/// open, are then named as unknown).
const PRUNE_WITHOUT_LIFETIME: Duration = Duration::from_secs(3600);

/// A checkout in progress.
#[derive(Debug)]
struct Checkout {
    since: Instant,
    origin: CheckoutOrigin,
    leak_reported: bool,
}

/// The rules of one pool, fixed when its sqlx options are built (see [`install`]).
#[derive(Debug, Clone, Copy)]
struct Rules {
    /// `None`: connections live as long as they work.
    max_lifetime: Option<Duration>,
    /// `None` when sqlx already pings on every acquire.
    idle_ping: Option<Duration>,
}

#[derive(Debug, Default)]
struct Known {
    /// End of each connection's `after_connect` → its id.
    born: BTreeMap<Instant, Arc<str>>,
    checkouts: HashMap<Arc<str>, Checkout>,
}

/// State shared by every hook closure of one pool.
#[derive(Debug)]
pub(crate) struct Hooks {
    telemetry: PoolTelemetry,
    /// `<prefix>-<tag>`: every connection id of these hooks starts with it.
    id_base: Arc<str>,
    next_id: Arc<AtomicU64>,
    generation: Arc<Generation>,
    test_if_idle_for: Duration,
    /// PgBouncer mode: a `SET` would stay on the pooler's server connection; no per-connection id
    /// is set on the server.
    no_server_id: bool,
    /// Several hosts / `target_session_attrs`: new connections and idle pings check the
    /// server's role.
    hosts: Option<Arc<super::hosts::Hosts>>,
    /// Reference instant and seed of the lifetime jitter.
    base: Instant,
    seed: u64,
    known: Mutex<Known>,
    /// The pool these hooks serve, for the `pool_size` of events (cleared when the manager goes,
    /// as the pool holds the hooks).
    pool: Mutex<Option<PgPool>>,
    pub(crate) counters: Counters,
    sink: Mutex<Option<LogSink>>,
}

use crate::sync::lock;

/// Six random lowercase letters and digits.
fn random_tag() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..6)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

impl Hooks {
    /// Hooks with a fresh random tag; ids take their numbers from `next_id`.
    pub(crate) fn new(pool: &PoolConfig, next_id: Arc<AtomicU64>, generation: Arc<Generation>) -> Hooks {
        Hooks {
            telemetry: PoolTelemetry::new(&pool.pool_label),
            id_base: format!("{}-{}", pool.application_name, random_tag()).into(),
            next_id,
            generation,
            test_if_idle_for: pool.test_if_idle_for,
            no_server_id: false,
            hosts: None,
            base: Instant::now(),
            seed: fastrand::u64(..),
            known: Mutex::new(Known::default()),
            pool: Mutex::new(None),
            counters: Counters::default(),
            sink: Mutex::new(None),
        }
    }

    /// PgBouncer mode: no per-connection `SET application_name` (it would stay on the pooler's
    /// server connection for its other clients).
    pub(crate) fn without_server_id(mut self, without: bool) -> Hooks {
        self.no_server_id = without;
        self
    }

    /// Several hosts / `target_session_attrs`: the role checks of new connections and idle pings.
    pub(crate) fn with_hosts(mut self, hosts: Option<Arc<super::hosts::Hosts>>) -> Hooks {
        self.hosts = hosts;
        self
    }

    pub(crate) fn pool_label(&self) -> &str {
        self.telemetry.label()
    }

    /// `<prefix>-<tag>`, followed by `-<n>` in every id of these hooks.
    pub(crate) fn id_base(&self) -> &str {
        &self.id_base
    }

    pub(crate) fn attach_pool(&self, pool: Option<PgPool>) {
        *lock(&self.pool) = pool;
    }

    fn pool_size(&self) -> u32 {
        lock(&self.pool).as_ref().map_or(0, |p| p.size())
    }

    pub(crate) fn set_sink(&self, sink: Option<LogSink>) -> Option<LogSink> {
        std::mem::replace(&mut *lock(&self.sink), sink)
    }

    /// Sends an event to the connection log, if one is attached.
    pub(crate) fn log(&self, event: ConnectionLogEvent) {
        let sink = lock(&self.sink).clone();
        if let Some(sink) = sink {
            sink.record(event);
        }
    }

    /// The id of the connection created `age` ago (see the module docs).
    fn identify(&self, age: Duration) -> Arc<str> {
        let now = Instant::now();
        let created = now.checked_sub(age).unwrap_or(now);
        let found = lock(&self.known)
            .born
            .range(..=created)
            .next_back()
            .filter(|(at, _)| created.saturating_duration_since(**at) <= IDENTITY_WINDOW)
            .map(|(_, id)| id.clone());
        found.unwrap_or_else(|| format!("{}-?", self.id_base).into())
    }

    /// `max_lifetime` minus a fraction (0–10 %) that is the same at every hook of one connection
    /// (it depends only on the creation instant) and spread across connections.
    fn lifetime(&self, max_lifetime: Duration, age: Duration) -> Duration {
        let now = Instant::now();
        max_lifetime.mul_f64(1.0 - 0.1 * self.jitter(now.checked_sub(age).unwrap_or(now)))
    }

    /// A fraction in `[0, 1)` drawn from the creation instant's bucket.
    fn jitter(&self, created: Instant) -> f64 {
        let bucket = (created.saturating_duration_since(self.base).as_nanos() / JITTER_BUCKET.as_nanos()) as u64;
        // splitmix64: consecutive buckets get unrelated fractions.
        let mut z = bucket ^ self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Why a connection must be closed rather than used or kept, if it must.
    fn verdict(&self, meta: &PoolConnectionMetadata, rules: Rules) -> Option<&'static str> {
        if self.generation.is_retired(meta.age) {
            self.counters.rejected_stale.fetch_add(1, Ordering::Relaxed);
            Some("stale")
        } else if rules
            .max_lifetime
            .is_some_and(|max| meta.age > self.lifetime(max, meta.age))
        {
            self.counters.rejected_expired.fetch_add(1, Ordering::Relaxed);
            Some("expired")
        } else {
            None
        }
    }

    /// Reports a connection the hooks are closing (or found dead) and forgets it.
    fn closed(&self, id: &Arc<str>, reason: &'static str, age: Duration) {
        {
            let mut known = lock(&self.known);
            known.checkouts.remove(id);
            known.born.retain(|_, v| v != id);
        }
        self.counters.closed.fetch_add(1, Ordering::Relaxed);
        self.log(self.telemetry.closed(id, self.pool_size(), reason, age));
    }

    fn failed(&self, id: &str, kind: &'static str, error: &sqlx::Error) {
        self.log(self.telemetry.failed(id, self.pool_size(), kind, error));
    }

    fn check_out(&self, id: &Arc<str>, origin: CheckoutOrigin) {
        let checkout = Checkout {
            since: Instant::now(),
            origin,
            leak_reported: false,
        };
        lock(&self.known).checkouts.insert(id.clone(), checkout);
        self.counters.acquired.fetch_add(1, Ordering::Relaxed);
    }

    // ---- the three sqlx hooks -------------------------------------------------------------

    async fn after_connect(&self, conn: &mut PgConnection, rules: Rules) -> Result<(), sqlx::Error> {
        use sqlx::Executor as _;

        let started = Instant::now();
        let n = self.next_id.fetch_add(1, Ordering::SeqCst) + 1;
        let id: Arc<str> = format!("{}-{n}", self.id_base).into();
        let role_check = self.hosts.as_ref().filter(|h| h.checks_role());
        let setup = match (self.no_server_id, role_check) {
            (true, None) => Ok(None),
            (false, None) => {
                let sql = format!("SET application_name = {}", quote_literal(&id));
                conn.execute(sqlx::AssertSqlSafe(sql)).await.map(|_| None)
            }
            // The server's role rides the same round trip.
            (true, Some(_)) => super::hosts::read(conn).await.map(Some),
            (false, Some(_)) => {
                let sql = format!(
                    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on', \
                     set_config('application_name', {}, false)",
                    quote_literal(&id)
                );
                super::hosts::read_from(conn, &sql).await.map(Some)
            }
        };
        match (setup, role_check) {
            (Err(error), _) => {
                self.counters.setup_failures.fetch_add(1, Ordering::Relaxed);
                self.failed(&id, "setup", &error);
                return Err(error);
            }
            (Ok(Some(role)), Some(hosts)) if !hosts.accepts(role) => {
                // sqlx retries the connect until `acquire_timeout`, reading the connect options
                // again: the selection this asks for points them at a qualifying host.
                hosts.wanted.notify_one();
                let error = sqlx::Error::Configuration(hosts.refusal(role).into());
                self.counters.setup_failures.fetch_add(1, Ordering::Relaxed);
                self.failed(&id, "setup", &error);
                return Err(error);
            }
            _ => {}
        }
        // sqlx hands a new connection straight to the acquire that opened it (the manager keeps
        // sqlx's own `min_connections` at 0), so its checkout starts here.
        let origin = CheckoutOrigin::capture();
        self.log(self.telemetry.opened(&id, self.pool_size(), started.elapsed(), &origin));
        self.counters.opened.fetch_add(1, Ordering::Relaxed);
        self.check_out(&id, origin);
        // Last, with no `.await` until the hook returns: sqlx stamps the creation just after.
        let now = Instant::now();
        let mut known = lock(&self.known);
        // Records of connections that outlived any lifetime twice over are dropped: those
        // connections are closed by now, or leaked and long reported.
        let lifetime = rules.max_lifetime.unwrap_or(PRUNE_WITHOUT_LIFETIME);
        if let Some(horizon) = now.checked_sub(lifetime * 2) {
            let kept = known.born.split_off(&horizon);
            for (_, old) in std::mem::replace(&mut known.born, kept) {
                known.checkouts.remove(&old);
            }
        }
        known.born.insert(now, id);
        Ok(())
    }

    async fn before_acquire(
        &self,
        conn: &mut PgConnection,
        meta: PoolConnectionMetadata,
        rules: Rules,
    ) -> Result<bool, sqlx::Error> {
        let id = self.identify(meta.age);
        if let Some(reason) = self.verdict(&meta, rules) {
            self.closed(&id, reason, meta.age);
            return Ok(false);
        }
        if let Some(idle) = rules.idle_ping
            && meta.idle_for >= idle
        {
            self.counters.idle_pings.fetch_add(1, Ordering::Relaxed);
            let ping = match self.hosts.as_ref().filter(|h| h.checks_role()) {
                None => sqlx::Connection::ping(&mut *conn).await.map(|()| None),
                // The role check rides the ping's round trip.
                Some(hosts) => super::hosts::read(conn).await.map(|role| Some((hosts, role))),
            };
            match ping {
                Err(error) => {
                    self.counters.ping_failures.fetch_add(1, Ordering::Relaxed);
                    self.failed(&id, "ping", &error);
                    self.closed(&id, "ping failed", meta.age);
                    return Err(error);
                }
                Ok(Some((hosts, role))) if !hosts.accepts(role) => {
                    // The server stopped qualifying (a demoted primary): every connection to it goes.
                    self.generation.retire_all();
                    hosts.wanted.notify_one();
                    self.closed(&id, "server role changed", meta.age);
                    return Ok(false);
                }
                Ok(_) => {}
            }
        }
        let origin = CheckoutOrigin::capture();
        events::connection_acquired(&id, self.pool_size(), &origin, meta.idle_for);
        self.check_out(&id, origin);
        Ok(true)
    }

    async fn after_release(&self, meta: PoolConnectionMetadata, rules: Rules) -> Result<bool, sqlx::Error> {
        let id = self.identify(meta.age);
        let checkout = lock(&self.known).checkouts.remove(&id);
        self.counters.released.fetch_add(1, Ordering::Relaxed);
        let held = checkout.as_ref().map(|c| c.since.elapsed());
        let correlation = checkout.as_ref().and_then(|c| c.origin.correlation_id.clone());
        events::connection_released(&id, self.pool_size(), correlation.as_deref(), held);
        match self.verdict(&meta, rules) {
            Some(reason) => {
                self.closed(&id, reason, meta.age);
                Ok(false)
            }
            None => Ok(true),
        }
    }

    /// Reports checkouts held longer than `threshold`, each once.
    pub(crate) fn scan_leaks(&self, threshold: Duration) {
        let leaks: Vec<(Arc<str>, Duration, CheckoutOrigin)> = lock(&self.known)
            .checkouts
            .iter_mut()
            .filter(|(_, c)| !c.leak_reported && c.since.elapsed() > threshold)
            .map(|(id, c)| {
                c.leak_reported = true;
                (id.clone(), c.since.elapsed(), c.origin.clone())
            })
            .collect();
        for (id, held, origin) in leaks {
            self.counters.leaks.fetch_add(1, Ordering::Relaxed);
            self.log(self.telemetry.leaked(&id, self.pool_size(), held, &origin));
        }
    }
}

/// Installs the hooks on sqlx pool options, keeping what was set on the SeaORM options (ours:
/// see `pool::connect_options`, then the user's):
///
/// - `max_lifetime` becomes the hooks' lifetime (jittered), and sqlx's own is turned off: sqlx
///   closes a connection past it on return without calling `after_release`, so that checkout
///   would never end;
/// - `test_before_acquire` stays as set; when it is on, sqlx pings every acquire and the idle
///   ping is skipped.
///
/// sqlx has one slot per hook and no getter, so a SeaORM `set_schema_search_path`,
/// `test_before_acquire_if_idle_for` or `map_sqlx_postgres_before_acquire` (all installed in those
/// slots) are replaced.
pub(crate) fn install(
    hooks: &Arc<Hooks>,
    options: sqlx::pool::PoolOptions<sqlx::Postgres>,
) -> sqlx::pool::PoolOptions<sqlx::Postgres> {
    let rules = Rules {
        max_lifetime: options.get_max_lifetime(),
        idle_ping: (!options.get_test_before_acquire()).then_some(hooks.test_if_idle_for),
    };
    let on_connect = hooks.clone();
    let on_acquire = hooks.clone();
    let on_release = hooks.clone();
    options
        .max_lifetime(None)
        .acquire_time_level(log::LevelFilter::Trace)
        .after_connect(move |conn, _meta| -> BoxFuture<'_, Result<(), sqlx::Error>> {
            let hooks = on_connect.clone();
            Box::pin(async move { hooks.after_connect(conn, rules).await })
        })
        .before_acquire(move |conn, meta| -> BoxFuture<'_, Result<bool, sqlx::Error>> {
            let hooks = on_acquire.clone();
            Box::pin(async move { hooks.before_acquire(conn, meta, rules).await })
        })
        .after_release(move |_conn, meta| -> BoxFuture<'_, Result<bool, sqlx::Error>> {
            let hooks = on_release.clone();
            Box::pin(async move { hooks.after_release(meta, rules).await })
        })
}

/// A PostgreSQL string literal (standard_conforming_strings is on since 9.1).
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(prefix: &str) -> Hooks {
        let pool = PoolConfig::default().application_name(prefix);
        Hooks::new(&pool, Arc::default(), Arc::new(Generation::new()))
    }

    #[test]
    fn ids_carry_a_random_tag() {
        let a = hooks("svc_1%");
        let b = hooks("svc_1%");
        let tag = a.id_base.strip_prefix("svc_1%-").unwrap();
        assert_eq!(tag.len(), 6);
        assert!(
            tag.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "{tag}"
        );
        assert_ne!(a.id_base, b.id_base, "two managers, two tags");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn lifetimes_are_stable_per_connection_and_spread_within_ten_percent() {
        let h = hooks("svc");
        let fractions: Vec<f64> = (0..200u64)
            .map(|i| {
                // A bucket's start, and the same connection seen a few microseconds later.
                let created = h.base + JITTER_BUCKET * (i as u32);
                let first = h.jitter(created);
                assert_eq!(h.jitter(created + Duration::from_micros(50)), first);
                first
            })
            .collect();
        assert!(fractions.iter().all(|f| (0.0..1.0).contains(f)));
        let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
        assert!((0.35..0.65).contains(&mean), "spread evenly: mean {mean}");
        let max = Duration::from_secs(100);
        let lifetime = h.lifetime(max, Duration::from_secs(1));
        assert!(lifetime <= max && lifetime >= max.mul_f64(0.9), "{lifetime:?}");
    }

    #[test]
    fn a_connection_is_found_by_its_creation_instant_and_a_miss_is_unknown() {
        let h = hooks("svc");
        let t0 = Instant::now();
        lock(&h.known).born.insert(t0, "svc-x-1".into());
        std::thread::sleep(Duration::from_millis(5));
        lock(&h.known).born.insert(Instant::now(), "svc-x-2".into());
        // sqlx's stamp follows the record by microseconds: `age` measured from just after it.
        let age = t0.elapsed() - Duration::from_micros(1);
        assert_eq!(&*h.identify(age), "svc-x-1");
        assert_eq!(&*h.identify(Duration::ZERO), "svc-x-2");
        let unknown = h.identify(t0.elapsed() + Duration::from_secs(5));
        assert_eq!(*unknown, format!("{}-?", h.id_base));
    }
}
