//! Logging setup: `tracing` with key/value fields, to standard error.
//!
//! `AIRLOCK_LOG` sets the filter (default `info`; for example `airlock=debug`), and
//! `AIRLOCK_LOG_FORMAT=json` switches to one JSON object per line for log shippers.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, with `default` as the filter when `AIRLOCK_LOG`
/// is unset. Safe to call more than once (later calls do nothing).
pub fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_env("AIRLOCK_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("AIRLOCK_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
