//! [`TargetSessionAttrs`]: which server of a multi-host `DATABASE_URL` a connection may use.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// libpq's `target_session_attrs`: what a server must be for a connection to use it.
///
/// With several hosts in `DATABASE_URL` (`postgres://a:5432,b:5432/db`, or `host=a,b`), they are
/// tried in order and the first that qualifies takes the pool's new connections; with one host
/// the attribute is still checked, so a pool never works against the wrong kind of server. The
/// checks are libpq's: `read-write` / `read-only` read `transaction_read_only`, `primary` /
/// `standby` read `pg_is_in_recovery()`.
///
/// ```
/// use sea_orm_tunnel::config::TargetSessionAttrs;
/// assert_eq!("read-write".parse::<TargetSessionAttrs>().unwrap(), TargetSessionAttrs::ReadWrite);
/// assert_eq!(TargetSessionAttrs::PreferStandby.to_string(), "prefer-standby");
/// assert!("writable".parse::<TargetSessionAttrs>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TargetSessionAttrs {
    /// Any server that accepts the connection (libpq's default).
    #[default]
    Any,
    /// A server whose sessions can write (`transaction_read_only` is off).
    ReadWrite,
    /// A server whose sessions are read-only (`transaction_read_only` is on).
    ReadOnly,
    /// A server not in recovery: the primary.
    Primary,
    /// A server in recovery: a standby.
    Standby,
    /// A standby if one of the hosts is, else any server.
    PreferStandby,
}

/// What a server said about itself: `pg_is_in_recovery()` and `transaction_read_only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ServerRole {
    pub(crate) in_recovery: bool,
    pub(crate) read_only: bool,
}

impl ServerRole {
    /// One round trip tells both (and works on a standby).
    pub(crate) const QUERY: &'static str =
        "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'";

    /// How a log line names this server.
    pub(crate) fn describe(self) -> &'static str {
        match (self.in_recovery, self.read_only) {
            (true, _) => "a standby (in recovery)",
            (false, true) => "a read-only primary",
            (false, false) => "a read-write primary",
        }
    }
}

impl TargetSessionAttrs {
    /// All values, in libpq's order.
    pub const ALL: [TargetSessionAttrs; 6] = [
        TargetSessionAttrs::Any,
        TargetSessionAttrs::ReadWrite,
        TargetSessionAttrs::ReadOnly,
        TargetSessionAttrs::Primary,
        TargetSessionAttrs::Standby,
        TargetSessionAttrs::PreferStandby,
    ];

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// Whether a server in `role` qualifies. `prefer-standby` accepts any server here; the
    /// preference is the host selection's (standbys first).
    pub(crate) fn accepts(self, role: ServerRole) -> bool {
        match self {
            TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => true,
            TargetSessionAttrs::ReadWrite => !role.read_only,
            TargetSessionAttrs::ReadOnly => role.read_only,
            TargetSessionAttrs::Primary => !role.in_recovery,
            TargetSessionAttrs::Standby => role.in_recovery,
        }
    }

    /// Whether the server's role must be read at all.
    pub(crate) fn checks_role(self) -> bool {
        self != TargetSessionAttrs::Any
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TargetSessionAttrs {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let t = s.trim();
        TargetSessionAttrs::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(t))
            .ok_or_else(|| {
                Error::config(
                    "target_session_attrs",
                    format!("{t:?} is not one of any, read-write, read-only, primary, standby, prefer-standby"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_qualify_as_libpq_says() {
        let primary = ServerRole {
            in_recovery: false,
            read_only: false,
        };
        let ro_primary = ServerRole {
            in_recovery: false,
            read_only: true,
        };
        let standby = ServerRole {
            in_recovery: true,
            read_only: true,
        };
        use TargetSessionAttrs as T;
        assert!(T::ReadWrite.accepts(primary) && !T::ReadWrite.accepts(ro_primary) && !T::ReadWrite.accepts(standby));
        assert!(!T::ReadOnly.accepts(primary) && T::ReadOnly.accepts(ro_primary) && T::ReadOnly.accepts(standby));
        assert!(T::Primary.accepts(primary) && T::Primary.accepts(ro_primary) && !T::Primary.accepts(standby));
        assert!(!T::Standby.accepts(primary) && T::Standby.accepts(standby));
        assert!(T::Any.accepts(standby) && T::PreferStandby.accepts(primary));
        for a in T::ALL {
            assert_eq!(a.as_str().parse::<T>().unwrap(), a);
        }
    }
}
