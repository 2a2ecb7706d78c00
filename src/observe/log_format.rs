//! How log lines are spelled: `text` for people, `json` for log pipelines.
//!
//! One choice for two streams: floodgate's own log lines on stderr
//! (`FLOODGATE_LOG_FORMAT`, written by env_logger through
//! [`write_json_record`]) and the access log on stdout
//! (`FLOODGATE_ACCESS_LOG`, see [`access_log`](super::access_log)). Both JSON
//! spellings are one object per line, written with serde_json so every
//! string is escaped, and both carry `time` as RFC 3339 UTC with
//! milliseconds, so a pipeline parses both without regexes.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

/// A log stream's spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Lines for people: env_logger's own for floodgate's log, `key=value`
    /// pairs (logfmt) for the access log.
    Text,
    /// One JSON object per line.
    Json,
}

/// The values `FLOODGATE_LOG_FORMAT` accepts.
pub const LOG_FORMAT_SYNTAX: &str = "text or json";

impl FromStr for LogFormat {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(()),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Writes the current time as RFC 3339 UTC with milliseconds
/// (`2026-03-01T12:00:00.123Z`).
pub fn write_time(out: &mut impl Write) -> io::Result<()> {
    write!(out, "{:.3}", jiff::Timestamp::now())
}

/// One floodgate log record as a JSON line: `time`, `level`, `target`,
/// `message` (env_logger's `format` callback, for `FLOODGATE_LOG_FORMAT=json`).
pub fn write_json_record(out: &mut impl Write, record: &log::Record<'_>) -> io::Result<()> {
    out.write_all(b"{\"time\":\"")?;
    write_time(out)?;
    out.write_all(b"\",\"level\":")?;
    serde_json::to_writer(&mut *out, record.level().as_str())?;
    out.write_all(b",\"target\":")?;
    serde_json::to_writer(&mut *out, record.target())?;
    out.write_all(b",\"message\":")?;
    match record.args().as_str() {
        Some(message) => serde_json::to_writer(&mut *out, message)?,
        None => serde_json::to_writer(&mut *out, &record.args().to_string())?,
    }
    out.write_all(b"}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_in_any_case_and_print_back() {
        assert_eq!("JSON".parse(), Ok(LogFormat::Json));
        assert_eq!(" text ".parse(), Ok(LogFormat::Text));
        assert_eq!("xml".parse::<LogFormat>(), Err(()));
        assert_eq!(LogFormat::Json.to_string(), "json");
    }

    #[test]
    fn a_record_is_one_json_line_with_its_message_escaped() {
        let mut out = Vec::new();
        write_json_record(
            &mut out,
            &log::Record::builder()
                .level(log::Level::Warn)
                .target("floodgate::server")
                .args(format_args!("a \"quoted\"\nline {}", 7))
                .build(),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(text.ends_with('\n'));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["level"], "WARN");
        assert_eq!(value["target"], "floodgate::server");
        assert_eq!(value["message"], "a \"quoted\"\nline 7");
        let time = value["time"].as_str().unwrap();
        assert!(
            time.ends_with('Z') && time.len() == "2026-03-01T12:00:00.123Z".len(),
            "{time}"
        );
        time.parse::<jiff::Timestamp>().unwrap();
    }
}
