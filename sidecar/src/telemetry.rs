//! Logging setup: `tracing` with key/value fields, to standard error.
//!
//! `AIRLOCK_LOG` sets the filter (default `info`; for example `airlock=debug`), and
//! `AIRLOCK_LOG_FORMAT=json` switches to one JSON object per line for log shippers.
//! Text lines are coloured only on a terminal, and never when `NO_COLOR` is set
//! (<https://no-color.org>): a log file or a container's log stream gets plain text.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, with `default` as the filter when `AIRLOCK_LOG`
/// is unset. Safe to call more than once (later calls do nothing).
pub fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_env("AIRLOCK_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let json = std::env::var("AIRLOCK_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Whether text logs are coloured: on a terminal, unless `NO_COLOR` is set to
/// anything but the empty string.
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
