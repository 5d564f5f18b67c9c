//! Test kit (feature `testkit`): real PostgreSQL, PgBouncer, OpenSSH `sshd`, an in-process russh
//! bastion and a TCP fault proxy, each started privately on a free loopback port in a temp dir.
//!
//! Our own integration tests use it; users can use it in theirs.

mod bastion;
pub use bastion::{Bastion, BastionOptions};
mod delay_proxy;
mod fault_proxy;
mod helpers;
mod pgbouncer;
mod postgres;
mod sandbox;
mod sshd;
mod util;
pub use delay_proxy::DelayProxy;
pub use fault_proxy::FaultProxy;
pub use helpers::{eventually, fast_config};
pub use pgbouncer::{PgBouncer, PgBouncerBuilder, PoolMode};
pub use postgres::{PgServerTls, TempPostgres};
pub use sandbox::Sandbox;
pub use sshd::{KeyKind, OpenSshd, OpenSshdBuilder, SshForward};
pub use util::TestkitError;
mod certs;
pub use certs::{CertPair, TestCa};
