//! Logging setup: `tracing` with key/value fields, to standard error.
//!
//! `AIRLOCK_LOG` sets the filter (default `info`; for example `airlock=debug`), and
//! `AIRLOCK_LOG_FORMAT=json` switches to one JSON object per line for log shippers.
//! Text lines are coloured only on a terminal, and never when `NO_COLOR` is set
//! (<https://no-color.org>): a log file or a container's log stream gets plain text.
//!
//! Field values carry text the agent chose (file names, ids, reasons), so text lines
//! escape every control character in them, and the Unicode marks that reorder or
//! break a line ([`escape_controls`], through `EscapedFields`): a file named
//! `x\nINFO intent applied` cannot forge a log line, nor an escape sequence repaint
//! an operator's terminal. (JSON lines escape control characters already.)

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

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
        builder.fmt_fields(EscapedFields).try_init()
    };
}

/// Formats fields as `tracing-subscriber`'s default does (the message bare, then
/// `name=value`, strings quoted), with every control character in a value escaped.
#[derive(Debug)]
struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl EscapingVisitor<'_, '_> {
    fn field(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let separator = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        let value = escape_controls(value);
        self.result = if field.name() == "message" {
            write!(self.writer, "{separator}{value}")
        } else {
            write!(self.writer, "{separator}{}={value}", field.name())
        };
    }
}

impl Visit for EscapingVisitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, value);
        } else {
            self.field(field, &format!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, &format!("{value:?}"));
    }
}

/// `text` with each character that could break or reorder a line on a terminal
/// written as its Rust escape (`\n`, `\u{1b}`, `\u{202e}`), everything else as it
/// is: control characters (line breaks, escape, ...), the line and paragraph
/// separators, and the bidirectional overrides that make text display in another
/// order than it is written. For log lines and for tables (`airlock status`) that
/// show text the agent chose.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(breaks_lines) {
        return text.into();
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if breaks_lines(c) {
            let _ = write!(escaped, "{}", c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    escaped.into()
}

/// Whether `c` is a character [`escape_controls`] escapes.
fn breaks_lines(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' // line and paragraph separators
                | '\u{061c}' | '\u{200e}' | '\u{200f}' // bidirectional marks
                | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' // embeddings, overrides, isolates
        )
}

/// Whether text logs are coloured: on a terminal, unless `NO_COLOR` is set to
/// anything but the empty string.
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::{colour, escape_controls};
    use std::ffi::OsStr;

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        assert_eq!(escape_controls("plain ünïcode"), "plain ünïcode");
        assert_eq!(
            escape_controls("a\nINFO forged\r\u{1b}[31m\t"),
            "a\\nINFO forged\\r\\u{1b}[31m\\t"
        );
        assert_eq!(
            escape_controls("invoice\u{202e}fdp.json\u{2028}x"),
            "invoice\\u{202e}fdp.json\\u{2028}x"
        );
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }
}
