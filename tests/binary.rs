//! The real `floodgate` binary: settings errors, ports in use, the admin
//! listener, the `healthcheck` subcommand, graceful shutdown on SIGTERM and
//! SIGINT, and the startup log.

mod support;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use floodgate::admin_probe;
use support::client::build;
use support::proxy::free_port;
use support::{Binary, eventually, get, patience, try_send, upstream};

const GENEROUS: &str = "1000/s";

/// An address on a port that was free a moment ago.
fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Runs `cmd` until it exits on its own (within [`patience`]), returning its
/// status and everything it wrote to stderr. A process that does not exit is
/// killed and fails the test.
fn run_to_exit(mut cmd: Command) -> (ExitStatus, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the floodgate binary");
    let unused = SocketAddr::from(([127, 0, 0, 1], 0));
    // `Binary` kills the child on drop, so a panic below leaks nothing.
    let mut binary = Binary {
        child,
        addr: unused,
        admin: unused,
    };
    let status = binary.wait_exit(patience());
    let stderr = binary.stderr();
    let status = status.unwrap_or_else(|| panic!("floodgate did not exit by itself:\n{stderr}"));
    (status, stderr)
}

/// Sends `signal` and waits for the exit, returning the status and how long
/// the process took to exit after the signal.
fn stop_with(binary: &mut Binary, signal: &str, limit: Duration) -> (ExitStatus, Duration) {
    let signalled = Instant::now();
    binary.signal(signal);
    match binary.wait_exit(limit) {
        Some(status) => (status, signalled.elapsed()),
        None => panic!(
            "floodgate still running {limit:?} after SIG{signal}:\n{}",
            binary.stderr()
        ),
    }
}

fn refuses_connections(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err()
}

// === settings ===

#[test]
fn every_bad_setting_is_reported_on_its_own_line_and_nothing_listens() {
    let listen = free_addr();
    let admin = free_addr();
    let (listen_s, admin_s) = (listen.to_string(), admin.to_string());
    let bad = [
        ("FLOODGATE_RATE", "10/mn"),
        ("FLOODGATE_BURST", "0"),
        ("FLOODGATE_UPSTREAM", "ftp://nowhere"),
        ("FLOODGATE_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("FLOODGATE_BACKEND", "postgres"),
        ("FLOODGATE_KEY", "cookie:x"),
    ];
    let mut env = bad.to_vec();
    env.push(("FLOODGATE_RAET", "10/min"));
    env.push(("FLOODGATE_LISTEN", &listen_s));
    env.push(("FLOODGATE_ADMIN_LISTEN", &admin_s));

    let (status, stderr) = run_to_exit(Binary::command(&env));

    assert!(
        !status.success(),
        "bad settings must fail: {status}\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        bad.len() + 1,
        "one line per problem, nothing else:\n{stderr}"
    );
    for line in &lines {
        assert!(line.starts_with("floodgate: error: "), "{line:?}");
    }
    for (var, value) in bad {
        let named = format!("{var}=\"{value}\"");
        let matching = lines.iter().filter(|l| l.contains(&named)).count();
        assert_eq!(matching, 1, "exactly one line names {named}:\n{stderr}");
    }
    let unknown = lines
        .iter()
        .filter(|l| l.contains("FLOODGATE_RAET: unknown setting"))
        .count();
    assert_eq!(unknown, 1, "the misspelt variable is named:\n{stderr}");
    assert!(
        refuses_connections(listen),
        "nothing may listen on {listen}"
    );
    assert!(refuses_connections(admin), "nothing may listen on {admin}");
}

#[test]
fn a_bad_value_in_a_settings_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("floodgate.toml");
    std::fs::write(&file, "rate = \"fast\"\n").unwrap();
    let listen = free_addr().to_string();
    let admin = free_addr().to_string();
    let (status, stderr) = run_to_exit(Binary::command(&[
        ("FLOODGATE_CONFIG", file.to_str().unwrap()),
        ("FLOODGATE_LISTEN", &listen),
        ("FLOODGATE_ADMIN_LISTEN", &admin),
    ]));
    assert!(!status.success(), "{status}\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let expected = format!("rate = \"fast\" in {}", file.display());
    assert!(lines[0].contains(&expected), "no {expected:?} in\n{stderr}");
}

#[test]
fn a_yaml_settings_file_is_used() {
    let up = upstream().run();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("floodgate.yaml");
    std::fs::write(
        &file,
        format!("upstream: \"http://{}\"\nrate: 1/h\n", up.addr()),
    )
    .unwrap();
    let fg = Binary::start(&[("FLOODGATE_CONFIG", file.to_str().unwrap())]);

    let first = get(fg.addr, "/");
    assert_eq!(first.status, 200, "the upstream from the file is used");
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"default\";q=1;w=3600"),
        "the rate from the file is used"
    );
    assert_eq!(get(fg.addr, "/").status, 429);
    assert_eq!(up.requests(), 1);
}

// === ports in use ===

#[test]
fn a_port_in_use_stops_startup_naming_the_setting_and_the_address() {
    let busy_main = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let main = busy_main.local_addr().unwrap();
    let admin = busy_admin.local_addr().unwrap();
    let main_problem = format!("FLOODGATE_LISTEN={main}: cannot listen");
    let admin_problem = format!("FLOODGATE_ADMIN_LISTEN={admin}: cannot listen");

    let run = |listen: SocketAddr, admin_listen: SocketAddr| {
        run_to_exit(Binary::command(&[
            ("FLOODGATE_LISTEN", &listen.to_string()),
            ("FLOODGATE_ADMIN_LISTEN", &admin_listen.to_string()),
        ]))
    };

    let (status, stderr) = run(main, free_addr());
    assert!(!status.success(), "{status}\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&main_problem),
        "no {main_problem:?} in\n{stderr}"
    );

    let (status, stderr) = run(free_addr(), admin);
    assert!(!status.success(), "{status}\n{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&admin_problem),
        "no {admin_problem:?} in\n{stderr}"
    );

    let (status, stderr) = run(main, admin);
    assert!(!status.success(), "{status}\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines.iter().any(|l| l.contains(&main_problem)), "{stderr}");
    assert!(lines.iter().any(|l| l.contains(&admin_problem)), "{stderr}");
}

// === admin listener ===

#[test]
fn admin_endpoints_answer_and_count_decisions() {
    let up = upstream()
        .route("/healthz", "upstream healthz")
        .route("/metrics", "upstream metrics")
        .run();
    let fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
        ("FLOODGATE_RATE", "4/h"),
    ]);

    let healthz = get(fg.admin, "/healthz");
    assert_eq!(healthz.status, 200);
    assert_eq!(healthz.text(), "ok\n");
    let readyz = get(fg.admin, "/readyz");
    assert_eq!(readyz.status, 200);
    assert!(readyz.text().contains("memory"), "{}", readyz.text());
    assert_eq!(
        get(fg.admin, "/anything").status,
        404,
        "the admin listener forwards nothing"
    );
    let page = get(fg.admin, "/");
    assert_eq!(page.status, 200, "/ is the status page");
    assert!(page.text().contains("floodgate status"), "{}", page.text());

    // The client port has no admin pages: these are forwarded and counted.
    let res = get(fg.addr, "/healthz");
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), "upstream healthz");
    let res = get(fg.addr, "/metrics");
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), "upstream metrics");
    let statuses: Vec<u16> = (0..5).map(|_| get(fg.addr, "/").status).collect();
    assert_eq!(statuses, [200, 200, 429, 429, 429]);
    let uris: Vec<String> = up.recorded().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, ["/healthz", "/metrics", "/", "/"]);

    let metrics = get(fg.admin, "/metrics");
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    assert_eq!(
        metrics.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(
        text.contains("# TYPE floodgate_requests counter\n"),
        "{text}"
    );
    for (decision, n) in [("allowed", 4), ("limited", 3), ("bad_key", 0)] {
        let by = if decision == "bad_key" {
            "none"
        } else {
            "backend"
        };
        let line = format!(
            "floodgate_requests_total{{rule=\"default\",decision=\"{decision}\",decided_by=\"{by}\"}} {n}\n"
        );
        assert!(text.contains(&line), "{line} in {text}");
    }
}

#[test]
fn healthcheck_subcommand_reflects_the_admin_listener() {
    let up = upstream().run();
    let fg = Binary::start(&[("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr()))]);

    let mut cmd = Binary::command(&[("FLOODGATE_ADMIN_LISTEN", &fg.admin.to_string())]);
    cmd.arg("healthcheck");
    let (status, stderr) = run_to_exit(cmd);
    assert!(status.success(), "{status}\n{stderr}");

    let nobody = free_addr();
    let mut cmd = Binary::command(&[("FLOODGATE_ADMIN_LISTEN", &nobody.to_string())]);
    cmd.arg("healthcheck");
    let (status, stderr) = run_to_exit(cmd);
    assert!(!status.success(), "nobody listens on {nobody}: {status}");
    assert!(
        stderr.contains("healthcheck") && stderr.contains(&nobody.to_string()),
        "{stderr}"
    );
    assert_eq!(up.requests(), 0, "health checks never reach the upstream");
}

// === shutdown ===

fn drains_in_flight_requests_then_exits_cleanly_on(signal: &str) {
    let latency = Duration::from_secs(2);
    let up = upstream().with_latency(latency).run();
    let mut fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
        ("FLOODGATE_RATE", GENEROUS),
    ]);
    let addr = fg.addr;
    let in_flight = std::thread::spawn(move || try_send(addr, &build("GET", "/slow", &[], b"")));
    eventually("the upstream to receive the request", || {
        (up.requests() == 1).then_some(())
    });

    let signalled = Instant::now();
    fg.signal(signal);
    eventually("/readyz to answer 503 while draining", || {
        (admin_probe(fg.admin, "/readyz").ok() == Some(503)).then_some(())
    });
    eventually("the client port to refuse new connections", || {
        refuses_connections(addr).then_some(())
    });
    let refusing_after = signalled.elapsed();
    assert!(
        fg.child.try_wait().unwrap().is_none(),
        "new connections must be refused while the in-flight request is still draining"
    );

    let res = in_flight
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the in-flight request failed: {e}"));
    assert_eq!(res.status, 200);
    assert_eq!(res.body, b"ok");

    let exit = fg.wait_exit(patience());
    let exited_after = signalled.elapsed();
    let stderr = fg.stderr();
    let status =
        exit.unwrap_or_else(|| panic!("floodgate did not exit after SIG{signal}:\n{stderr}"));
    println!(
        "SIG{signal}: refusing new connections after {refusing_after:?}, exited after {exited_after:?} (upstream latency {latency:?})"
    );
    assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    assert!(
        stderr.contains(&format!("SIG{signal} received")),
        "{stderr}"
    );
    assert_eq!(up.requests(), 1);
}

#[test]
fn sigterm_drains_in_flight_requests_then_exits_cleanly() {
    drains_in_flight_requests_then_exits_cleanly_on("TERM");
}

#[test]
fn sigint_drains_in_flight_requests_then_exits_cleanly() {
    drains_in_flight_requests_then_exits_cleanly_on("INT");
}

#[test]
fn a_stuck_request_delays_exit_only_by_the_shutdown_timeout() {
    let up = upstream().with_latency(Duration::from_secs(30)).run();
    let mut fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
        ("FLOODGATE_RATE", GENEROUS),
        ("FLOODGATE_SHUTDOWN_TIMEOUT", "1s"),
        ("FLOODGATE_UPSTREAM_TIMEOUT", "60s"),
    ]);
    let addr = fg.addr;
    let in_flight = std::thread::spawn(move || try_send(addr, &build("GET", "/stuck", &[], b"")));
    eventually("the upstream to receive the request", || {
        (up.requests() == 1).then_some(())
    });

    let (status, took) = stop_with(&mut fg, "TERM", Duration::from_secs(10));
    println!("SIGTERM with a stuck request and a 1s shutdown timeout: exited after {took:?}");
    let stderr = fg.stderr();
    assert!(
        took < Duration::from_secs(5),
        "exit took {took:?}, shutdown timeout 1s\n{stderr}"
    );
    assert!(
        took >= Duration::from_millis(500),
        "the in-flight request was not given its shutdown timeout: exited after {took:?}"
    );
    assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    let res = in_flight.join().unwrap();
    assert!(
        !matches!(&res, Ok(r) if r.status == 200),
        "a request cut off at shutdown cannot have completed: {res:?}"
    );
}

// === startup log ===

#[test]
fn startup_logs_one_serving_line_without_secrets() {
    let up = upstream().run();
    let upstream_url = format!("http://{}", up.addr());
    let mut fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &upstream_url),
        ("FLOODGATE_RATE", "7/min"),
        ("FLOODGATE_REDIS_URL", "redis://:hunter2@127.0.0.1:6379/0"),
    ]);
    let (status, _) = stop_with(&mut fg, "TERM", patience());
    let stderr = fg.stderr();
    assert_eq!(status.code(), Some(0), "{status}\n{stderr}");

    let serving: Vec<&str> = stderr.lines().filter(|l| l.contains("serving:")).collect();
    assert_eq!(serving.len(), 1, "{stderr}");
    let line = serving[0];
    for expected in [
        format!("listen={}", fg.addr),
        format!("upstream={upstream_url}"),
        "rate=7/min".to_owned(),
        format!("admin_listen={}", fg.admin),
        "headers=ietf".to_owned(),
    ] {
        assert!(line.contains(&expected), "no {expected:?} in {line:?}");
    }
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn a_redis_password_never_reaches_stderr() {
    let listen = free_addr();
    let admin = free_addr();
    let child = Binary::command(&[
        ("FLOODGATE_BACKEND", "redis"),
        ("FLOODGATE_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0"),
        ("FLOODGATE_LISTEN", &listen.to_string()),
        ("FLOODGATE_ADMIN_LISTEN", &admin.to_string()),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawning the floodgate binary");
    let mut fg = Binary {
        child,
        addr: listen,
        admin,
    };
    // Whether it refuses to start or serves (and fails to reach Redis), the
    // password must not be printed.
    let exited = eventually("floodgate to exit or serve", || {
        match fg.child.try_wait().unwrap() {
            Some(_) => Some(true),
            None => (admin_probe(admin, "/healthz").ok() == Some(200)).then_some(false),
        }
    });
    if !exited {
        let _ = try_send(listen, &build("GET", "/", &[], b""));
        stop_with(&mut fg, "TERM", patience());
    }
    let stderr = fg.stderr();
    assert!(!stderr.is_empty(), "floodgate said nothing");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    if !exited {
        let serving = stderr.lines().find(|l| l.contains("serving:"));
        assert!(
            serving.is_some_and(|l| l.contains("redis://:***@127.0.0.1:1/0")),
            "the startup line names Redis without its password:\n{stderr}"
        );
    }
}

#[test]
fn the_admin_token_never_reaches_stderr_set_or_refused() {
    // Too short: refused before anything listens, naming the variable only.
    let (status, stderr) = run_to_exit(Binary::command(&[
        ("FLOODGATE_ADMIN_TOKEN", "tiny-secret"),
        ("FLOODGATE_LISTEN", &free_addr().to_string()),
        ("FLOODGATE_ADMIN_LISTEN", &free_addr().to_string()),
    ]));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("FLOODGATE_ADMIN_TOKEN=\"<hidden>\": 11 characters"),
        "{stderr}"
    );
    assert!(!stderr.contains("tiny-secret"), "{stderr}");
    // Set and accepted: the startup line says so, without it.
    let secret = "a-long-enough-admin-secret-42";
    let mut fg = Binary::start(&[("FLOODGATE_ADMIN_TOKEN", secret)]);
    let (status, _) = stop_with(&mut fg, "TERM", patience());
    let stderr = fg.stderr();
    assert_eq!(status.code(), Some(0), "{status}\n{stderr}");
    assert!(stderr.contains(" admin_token=set"), "{stderr}");
    assert!(!stderr.contains(secret), "{stderr}");
}

// === open-file limit ===

/// The binary started by `sh` after `ulimit {ulimit}` (so the limits apply
/// to it alone), with `env`, once `/healthz` answers.
fn start_under_ulimit(ulimit: &str, env: &[(&str, &str)]) -> Binary {
    let (listen, admin) = (free_addr(), free_addr());
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("ulimit {ulimit} && exec \"$0\""))
        .arg(env!("CARGO_BIN_EXE_floodgate"))
        .env_clear()
        .env("RUST_LOG", "info")
        .env("FLOODGATE_LISTEN", listen.to_string())
        .env("FLOODGATE_ADMIN_LISTEN", admin.to_string())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawning sh");
    let mut fg = Binary {
        child,
        addr: listen,
        admin,
    };
    let serving = eventually("floodgate to exit or serve", || {
        match fg.child.try_wait().unwrap() {
            Some(_) => Some(false),
            None => (admin_probe(admin, "/healthz").ok() == Some(200)).then_some(true),
        }
    });
    assert!(serving, "floodgate exited:\n{}", fg.stderr());
    fg
}

/// (soft, hard) `Max open files` of a process.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn the_open_file_soft_limit_is_raised_to_the_hard_limit_and_logged_once() {
    let up = upstream().run();
    let (_, hard) = open_file_limits(std::process::id());
    assert!(
        hard > 256,
        "this test needs a hard limit above 256, not {hard}"
    );
    let mut fg = start_under_ulimit(
        "-S -n 256",
        &[
            ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
            ("FLOODGATE_MAX_CONNECTIONS", "16"),
        ],
    );
    assert_eq!(
        open_file_limits(fg.pid()),
        (hard, hard),
        "the soft limit is the hard limit"
    );
    assert_eq!(get(fg.addr, "/").status, 200, "floodgate serves");
    let stderr = fg.stderr();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("open files"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&format!(
            "soft limit raised from 256 to the hard limit {hard}"
        )),
        "{stderr}"
    );
    assert!(lines[0].contains("INFO"), "{stderr}");
    assert!(!stderr.contains("WARN"), "{stderr}");
}

#[test]
fn too_low_an_open_file_limit_for_max_connections_is_a_warning() {
    let up = upstream().run();
    let mut fg = start_under_ulimit(
        "-n 300",
        &[
            ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
            ("FLOODGATE_MAX_CONNECTIONS", "1000"),
            ("FLOODGATE_WORKERS", "2"),
        ],
    );
    assert_eq!(get(fg.addr, "/").status, 200, "floodgate serves anyway");
    let stderr = fg.stderr();
    assert!(
        stderr.contains("open files: soft limit 300 is already the hard limit 300"),
        "{stderr}"
    );
    let warning = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("FLOODGATE_MAX_CONNECTIONS=1000"))
        .unwrap_or_else(|| panic!("no warning naming the setting:\n{stderr}"));
    assert!(
        warning.contains("needs about 2576 open files but the limit is 300"),
        "{warning}"
    );
}
