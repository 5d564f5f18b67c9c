//! Shared helpers of the integration tests, by concern: servers (and the environment that
//! configures a child for them), waits, tracing captures, metrics, SQL, HTTP, hostile inputs, and
//! running a test in a process of its own.
#![allow(dead_code, unreachable_pub)]

mod agent;
mod capture;
mod hostile;
mod http_app;
mod process;
mod recorder;
mod servers;
mod sql;
mod waits;

pub use agent::*;
pub use capture::*;
pub use hostile::*;
pub use http_app::*;
pub use process::*;
pub use recorder::*;
pub use servers::*;
pub use sql::*;
pub use waits::*;
