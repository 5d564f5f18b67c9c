//! Deployment profiles and the defaults they select.
//!
//! The numbers are in [`ProfileDefaults::DEVELOPMENT`] and [`ProfileDefaults::PRODUCTION`];
//! everything that does not depend on the profile is a constant here too, so every
//! default of the crate is written down in one place.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::Profile;
use crate::Error;

/// The profile-dependent defaults.
///
/// | | development | production |
/// |---|---|---|
/// | max connections | 20 | 100 |
/// | idle timeout | 30 000 ms | 30 000 ms |
/// | connection timeout | 2 000 ms | 3 000 ms |
/// | health-check interval | 60 000 ms | 30 000 ms |
/// | ssh max channels (per session) | 10 | 20 |
/// | ssh max sessions | 4 | **5** |
/// | ssh max retries | 3 | 5 |
/// | ssh retry delay | 1 000 ms | 2 000 ms |
///
/// # Why production opens up to 5 SSH sessions, not 4
///
/// Validation rejects `max_connections > max_channels × max_sessions`, because a pool larger than
/// what the tunnel can carry would make the surplus connections wait for a channel until their
/// acquire timeout. With the production numbers (100 connections, 20 channels per session) the
/// usual 4 sessions carry only 80 connections, so the production profile itself would be
/// rejected. Production therefore defaults to 5 sessions (20 × 5 = 100); development keeps 4
/// (10 × 4 = 40 ≥ 20). `SSH_MAX_SESSIONS` still overrides either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProfileDefaults {
    /// `POSTGRES_MAX_CONNECTIONS`.
    pub max_connections: u32,
    /// `POSTGRES_IDLE_TIMEOUT`.
    pub idle_timeout: Duration,
    /// `POSTGRES_CONNECTION_TIMEOUT` (also the SSH connect timeout).
    pub connect_timeout: Duration,
    /// `POSTGRES_HEALTH_CHECK_INTERVAL`.
    pub health_check_interval: Duration,
    /// `SSH_MAX_CHANNELS`: forwarded connections per SSH session.
    pub max_channels: usize,
    /// `SSH_MAX_SESSIONS`.
    pub max_sessions: usize,
    /// `SSH_MAX_RETRIES`.
    pub ssh_max_retries: u32,
    /// `SSH_RETRY_DELAY`.
    pub ssh_retry_delay: Duration,
}

impl ProfileDefaults {
    /// `APP_ENV=development`.
    pub const DEVELOPMENT: ProfileDefaults = ProfileDefaults {
        max_connections: 20,
        idle_timeout: Duration::from_millis(30_000),
        connect_timeout: Duration::from_millis(2_000),
        health_check_interval: Duration::from_millis(60_000),
        max_channels: 10,
        max_sessions: 4,
        ssh_max_retries: 3,
        ssh_retry_delay: Duration::from_millis(1_000),
    };

    /// `APP_ENV=production`. See the type docs for why `max_sessions` is 5.
    pub const PRODUCTION: ProfileDefaults = ProfileDefaults {
        max_connections: 100,
        idle_timeout: Duration::from_millis(30_000),
        connect_timeout: Duration::from_millis(3_000),
        health_check_interval: Duration::from_millis(30_000),
        max_channels: 20,
        max_sessions: 5,
        ssh_max_retries: 5,
        ssh_retry_delay: Duration::from_millis(2_000),
    };
}

// Defaults that do not depend on the profile. Each one's reason is on the builder setter that
// documents it; they live here so there is one list.

/// `POSTGRES_MIN_CONNECTIONS`.
pub(crate) const MIN_CONNECTIONS: u32 = 0;
/// `POSTGRES_MAX_LIFETIME`.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// Idle time after which a pooled connection is pinged before it is handed out.
pub(crate) const TEST_IF_IDLE_FOR: Duration = Duration::from_secs(10);
/// `POSTGRES_APPLICATION_NAME`.
pub(crate) const APPLICATION_NAME: &str = "sea-orm-tunnel";
/// `SHUTDOWN_DRAIN_TIMEOUT`.
pub(crate) const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_millis(5_000);
/// Timeout of one health probe.
pub(crate) const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// `SSH_PORT`.
pub(crate) const SSH_PORT: u16 = 22;
/// `SSH_KEEPALIVE_INTERVAL`.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(5_000);
/// `SSH_KEEPALIVE_MAX`.
pub(crate) const KEEPALIVE_MAX: usize = 3;
/// Port of `DATABASE_URL` (and of the remote target) when none is given.
pub(crate) const POSTGRES_PORT: u16 = 5432;

impl Profile {
    /// The defaults this profile selects.
    pub const fn defaults(self) -> ProfileDefaults {
        match self {
            Profile::Development => ProfileDefaults::DEVELOPMENT,
            Profile::Production => ProfileDefaults::PRODUCTION,
        }
    }

    /// The `APP_ENV` spelling: `development` or `production`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Profile::Development => "development",
            Profile::Production => "production",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Profile {
    type Err = Error;

    /// Accepts `development`/`dev` and `production`/`prod`, case-insensitive.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "development" | "dev" => Ok(Profile::Development),
            "production" | "prod" => Ok(Profile::Production),
            _ => Err(Error::config(
                "APP_ENV",
                format!("{s:?} is not a profile (expected `development` or `production`)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_profiles_fit_through_their_tunnel() {
        for p in [Profile::Development, Profile::Production] {
            let d = p.defaults();
            assert!(
                d.max_connections as usize <= d.max_channels * d.max_sessions,
                "{p}: {} > {} x {}",
                d.max_connections,
                d.max_channels,
                d.max_sessions
            );
        }
    }

    #[test]
    fn profile_names_round_trip() {
        for p in [Profile::Development, Profile::Production] {
            assert_eq!(p.as_str().parse::<Profile>().unwrap(), p);
        }
        assert_eq!("PROD".parse::<Profile>().unwrap(), Profile::Production);
        let e = "staging".parse::<Profile>().unwrap_err().to_string();
        assert!(e.contains("APP_ENV") && e.contains("\"staging\""), "{e}");
    }
}
