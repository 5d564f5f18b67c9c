//! The singleton API (`initialize_instance`, `get_instance`, `reset_instance`): a thin facade over one process-wide [`SshTunnel`] slot.
//!
//! Prefer passing an [`SshTunnel`] handle around (it is `Clone`); the facade exists for code
//! shaped around `getInstance()`.

use std::sync::RwLock;

use super::SshTunnel;
use crate::config::TunnelConfig;
use crate::{Error, Result};

/// The instance, readable without awaiting.
static SLOT: RwLock<Option<SshTunnel>> = RwLock::new(None);
/// Serialises initialise/reset so two concurrent initialisations connect once.
static INIT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn current() -> Option<SshTunnel> {
    SLOT.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn store(tunnel: Option<SshTunnel>) -> Option<SshTunnel> {
    std::mem::replace(&mut *SLOT.write().unwrap_or_else(|e| e.into_inner()), tunnel)
}

impl SshTunnel {
    /// Connects the process-wide tunnel with `config`, or returns the existing instance if one is
    /// already initialised (its configuration wins; `config` is then ignored).
    ///
    /// Concurrent calls connect once and all get the same instance.
    pub async fn initialize_instance(config: TunnelConfig) -> Result<SshTunnel> {
        if let Some(existing) = current() {
            return Ok(existing);
        }
        let _init = INIT.lock().await;
        if let Some(existing) = current() {
            return Ok(existing);
        }
        let tunnel = SshTunnel::connect(config).await?;
        store(Some(tunnel.clone()));
        Ok(tunnel)
    }

    /// [`initialize_instance`](Self::initialize_instance) with [`TunnelConfig::from_env`]
    /// (`SSH_HOST`, `SSH_USER`, ... and `.env.local` / `.env`).
    pub async fn initialize_from_env() -> Result<SshTunnel> {
        if let Some(existing) = current() {
            return Ok(existing);
        }
        let config = TunnelConfig::from_env()?;
        Self::initialize_instance(config).await
    }

    /// The process-wide tunnel, or [`Error::NotInitialized`] (never a panic) before
    /// [`initialize_instance`](Self::initialize_instance).
    pub fn get_instance() -> Result<SshTunnel> {
        current().ok_or(Error::NotInitialized("SshTunnel"))
    }

    /// Disconnects and forgets the process-wide tunnel (if any); the next
    /// [`initialize_instance`](Self::initialize_instance) connects a new one. Handles to the old
    /// instance keep working as handles but report it disconnected.
    pub async fn reset_instance() {
        let _init = INIT.lock().await;
        if let Some(old) = store(None) {
            old.disconnect().await;
        }
    }
}
