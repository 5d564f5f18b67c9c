//! The SSH tunnel.

pub(crate) mod host_key;
