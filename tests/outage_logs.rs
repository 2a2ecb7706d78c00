//! README, "Troubleshooting": an outage is logged when it starts and when it
//! ends (with a count every 10 s in between), never once per request. The
//! real binary under sustained traffic (5 requests a second for 4 s) with
//! Redis frozen under the `closed` policy, and with the upstream down.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use floodgate::admin_probe;
use floodgate::outage::QUIET;
use support::proxy::free_port;
use support::upstream::read_head;
use support::{Binary, RedisServer, eventually, get, patience, upstream};

/// The traffic while a dependency is down.
const RATE: u32 = 5;
const FOR: Duration = Duration::from_secs(4);

/// Sends `RATE` requests a second for `FOR`, returning their statuses.
fn sustained_traffic(addr: SocketAddr) -> Vec<u16> {
    let start = Instant::now();
    let mut statuses = Vec::new();
    for i in 0..RATE * FOR.as_secs() as u32 {
        let due = start + FOR * i / (RATE * FOR.as_secs() as u32);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait); // the traffic's pace, not a wait for a condition
        }
        statuses.push(get(addr, "/").status);
    }
    statuses
}

/// Sends requests until one is answered `200` at least [`QUIET`] after the
/// last failure, which ends the outage; returns how many failed meanwhile.
fn traffic_until_recovered(addr: SocketAddr) -> usize {
    let mut last_failure = Instant::now();
    let mut failed = 0;
    eventually("a success a quiet second after the last failure", || {
        let ok = get(addr, "/").status == 200;
        if !ok {
            failed += 1;
            last_failure = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(1000 / u64::from(RATE)));
        (ok && last_failure.elapsed() > QUIET + Duration::from_millis(200)).then_some(())
    });
    failed
}

fn stop(fg: &mut Binary) -> String {
    fg.signal("TERM");
    let status = fg.wait_exit(patience());
    let stderr = fg.stderr();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
    stderr
}

/// The warnings logged while serving (after the startup line, so a startup
/// warning about this machine's limits is not counted as traffic).
fn warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .skip_while(|l| !l.contains(" serving: "))
        .filter(|l| l.contains(" WARN "))
        .collect()
}

fn count(lines: &[&str], text: &str) -> usize {
    lines.iter().filter(|l| l.contains(text)).count()
}

#[test]
fn redis_frozen_under_closed_policy_is_logged_as_one_outage() {
    let redis = RedisServer::start();
    let up = upstream().run();
    let mut fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
        ("FLOODGATE_BACKEND", "redis"),
        ("FLOODGATE_REDIS_URL", &redis.url()),
        ("FLOODGATE_REDIS_FAILURE", "closed"),
        ("FLOODGATE_RATE", "1000/s"),
    ]);
    eventually("readyz 200 once redis is connected", || {
        (admin_probe(fg.admin, "/readyz").ok() == Some(200)).then_some(())
    });
    assert_eq!(get(fg.addr, "/").status, 200);

    redis.freeze();
    let statuses = sustained_traffic(fg.addr);
    let refused = statuses.iter().filter(|s| **s == 503).count();
    assert!(
        refused >= statuses.len() - 1,
        "closed policy: {statuses:?}\n{}",
        redis.log()
    );
    redis.thaw();
    let refused = refused + traffic_until_recovered(fg.addr);
    let stderr = stop(&mut fg);

    let warnings = warnings(&stderr);
    assert_eq!(
        count(&warnings, "answering 503"),
        0,
        "no line per request:\n{stderr}"
    );
    assert_eq!(
        count(&warnings, "rate limiter (redis backend) failing"),
        1,
        "{stderr}"
    );
    assert_eq!(
        count(
            &warnings,
            "rate limiter (redis backend) answering again after"
        ),
        1,
        "{stderr}"
    );
    let end = warnings
        .iter()
        .find(|l| l.contains("rate limiter (redis backend) answering again"))
        .unwrap();
    assert!(
        end.contains(&format!(
            "during the outage {refused} requests answered 503"
        )),
        "the end line counts the refused requests ({refused}): {end}"
    );
    // The circuit's own start and end, the outage's start and end, and a
    // count only if the run took over 10 s.
    let summaries = count(&warnings, "still failing");
    assert!(
        warnings.len() - summaries <= 4 && summaries <= 1,
        "{} warnings for {} requests during the outage:\n{stderr}",
        warnings.len(),
        statuses.len()
    );
}

#[test]
fn an_upstream_down_is_logged_as_one_outage() {
    let port = free_port();
    let mut fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &format!("http://127.0.0.1:{port}")),
        ("FLOODGATE_RATE", "1000/s"),
    ]);
    let statuses = sustained_traffic(fg.addr);
    assert!(statuses.iter().all(|s| *s == 502), "{statuses:?}");

    // The upstream appears.
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("the upstream's port is free");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                loop {
                    if read_head(&mut reader).is_empty() {
                        return;
                    }
                    if stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    let failed = statuses.len() + traffic_until_recovered(fg.addr);
    let stderr = stop(&mut fg);

    let warnings = warnings(&stderr);
    let upstream = format!("upstream http://127.0.0.1:{port}");
    assert_eq!(
        count(&warnings, "answering 502"),
        0,
        "no line per request:\n{stderr}"
    );
    assert_eq!(
        count(&warnings, &format!("{upstream} failing")),
        1,
        "{stderr}"
    );
    let ends: Vec<&&str> = warnings
        .iter()
        .filter(|l| l.contains(&format!("{upstream} answering again after")))
        .collect();
    assert_eq!(ends.len(), 1, "{stderr}");
    assert!(
        ends[0].contains(&format!("during the outage {failed} requests answered 502")),
        "the end line counts the failed requests ({failed}): {}",
        ends[0]
    );
    let summaries = count(&warnings, "still failing");
    assert!(
        warnings.len() - summaries == 2 && summaries <= 1,
        "a start, an end, and a count only if the run took over 10 s:\n{stderr}"
    );
}
