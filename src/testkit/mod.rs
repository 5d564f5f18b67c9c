//! Test kit (feature `testkit`): real PostgreSQL, OpenSSH `sshd`, an in-process russh bastion
//! and a TCP fault proxy, each started privately on a free loopback port in a temp dir.
//!
//! Our own integration tests use it; users can use it in theirs.

mod bastion;
mod fault_proxy;
mod postgres;
mod sshd;
