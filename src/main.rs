//! The floodgate binary: logging, settings, bind, open-file limit, serve.
//! Nothing else.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use floodgate::observe::{AccessLog, LogFormat, log_format};
use floodgate::server::{self, Floodgate, Listeners};
use floodgate::settings::Settings;

/// How long the process waits at exit for the access log's last lines to
/// reach stdout (longer only if stdout is stalled: those lines are lost).
const ACCESS_LOG_PATIENCE: Duration = Duration::from_secs(2);

// mimalloc: about 5% fewer instructions per forwarded request than glibc's
// malloc (callgrind: 20.8k -> 19.7k; refusals 9.3k -> 9.1k), for about 20%
// more memory per tracked key (1M keys: +42 MiB, glibc +35 MiB). Only the
// binary sets it; embedders keep their own allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "\
usage: floodgate               serve, configured by FLOODGATE_* variables
       floodgate healthcheck   exit 0 if the local floodgate answers /healthz
       floodgate --version

Settings: see settings/default.toml or the README; FLOODGATE_CONFIG names a
TOML or YAML settings file.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => {}
        ["healthcheck"] => {
            init_logging(LogFormat::Text);
            return healthcheck();
        }
        ["--version" | "-V"] => {
            println!("floodgate {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        ["--help" | "-h"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }

    // Before the logger starts: FLOODGATE_LOG_FORMAT says how it writes.
    // Settings log nothing while they load; a bad one is a plain line.
    let settings = match Settings::load(std::env::vars()) {
        Ok(settings) => settings,
        Err(err) => return fail(LogFormat::Text, &err.problems),
    };
    let format = settings.log_format;
    init_logging(format);
    let listeners = match Listeners::bind(&settings) {
        Ok(listeners) => listeners,
        Err(problems) => return fail(format, &problems),
    };
    server::raise_open_file_limit(&settings);
    let summary = settings.summary();
    let floodgate = match Floodgate::new(settings) {
        Ok(floodgate) => floodgate,
        Err(err) => return fail(format, &[format!("{err:#}")]),
    };
    let access_log_closed = floodgate.access_log.as_ref().map(AccessLog::closed);

    let result = actix_web::rt::System::new().block_on(async move {
        let running = server::start(floodgate, listeners)?;
        log::info!("floodgate {} serving: {summary}", env!("CARGO_PKG_VERSION"));
        running.until_signal().await
    });
    if let Some(closed) = access_log_closed
        && !closed.wait(ACCESS_LOG_PATIENCE)
    {
        log::warn!(
            "access log: its last lines did not reach stdout within {ACCESS_LOG_PATIENCE:?}"
        );
    }
    match result {
        Ok(()) => {
            log::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(err) => fail(format, &[format!("{err:#}")]),
    }
}

/// env_logger on stderr, `RUST_LOG` (default `info`), spelled as `format`
/// says.
fn init_logging(format: LogFormat) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if format == LogFormat::Json {
        builder.format(log_format::write_json_record);
    }
    builder.init();
}

/// One line per problem on stderr (a JSON record each under
/// `FLOODGATE_LOG_FORMAT=json`), then exit 2.
fn fail(format: LogFormat, problems: &[String]) -> ExitCode {
    let mut stderr = std::io::stderr().lock();
    for problem in problems {
        let line = format!("floodgate: error: {problem}");
        let _ = match format {
            LogFormat::Text => writeln!(stderr, "{line}"),
            LogFormat::Json => log_format::write_json_record(
                &mut stderr,
                &log::Record::builder()
                    .level(log::Level::Error)
                    .target("floodgate")
                    .args(format_args!("{line}"))
                    .build(),
            ),
        };
    }
    ExitCode::from(2)
}

/// `GET /healthz` on the admin listener, for container health checks (the
/// runtime image has no curl).
fn healthcheck() -> ExitCode {
    let addr = match Settings::load(std::env::vars()) {
        Ok(settings) => settings.admin_listen,
        Err(err) => return fail(LogFormat::Text, &err.problems),
    };
    match floodgate::admin_probe(addr, "/healthz") {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("floodgate: healthcheck: /healthz answered {status}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("floodgate: healthcheck: {addr}: {err}");
            ExitCode::FAILURE
        }
    }
}
