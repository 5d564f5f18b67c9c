//! The crate's one poison-tolerant mutex lock.

use std::sync::{Mutex, MutexGuard};

/// Locks a std mutex, ignoring poisoning: what the crate keeps under its mutexes are plain
/// values that stay consistent even if a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
