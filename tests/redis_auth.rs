//! README, "Running several replicas": a Redis that refuses floodgate's
//! credentials (wrong password, no password, an ACL user without the script)
//! is a configuration error, not an outage: one `error` line naming the
//! cause, `/readyz` answering 503 with it, and no restart needed once the
//! Redis side is fixed. The real binary against a real redis-server.

mod support;

use support::{Binary, RedisServer, eventually, get, patience};

/// The password the Redis servers here require.
const PASSWORD: &str = "s3cret-9d1c";
/// A password floodgate is given that Redis does not accept.
const NOT_IT: &str = "not-the-password-7f3a";

/// `redis-cli` as the default user, who knows [`PASSWORD`].
fn admin_cli(redis: &RedisServer, args: &[&str]) {
    let mut all = vec!["--no-auth-warning", "-a", PASSWORD];
    all.extend_from_slice(args);
    assert_eq!(
        redis.cli(&all).as_deref(),
        Some("OK"),
        "redis-cli {args:?}; log:\n{}",
        redis.log()
    );
}

fn password_protected() -> RedisServer {
    let redis = RedisServer::start();
    assert_eq!(
        redis
            .cli(&["CONFIG", "SET", "requirepass", PASSWORD])
            .as_deref(),
        Some("OK")
    );
    redis
}

/// Serves floodgate against `url` (local policy, the default) until
/// `/readyz` answers 503, and returns that answer's body.
fn refused_readyz(fg: &Binary) -> String {
    eventually("/readyz to answer 503", || {
        let res = get(fg.admin, "/readyz");
        (res.status == 503).then(|| res.text())
    })
}

fn ready_again(fg: &Binary) {
    eventually("/readyz to answer 200 once redis accepts floodgate", || {
        (get(fg.admin, "/readyz").status == 200).then_some(())
    });
}

fn start(url: &str) -> Binary {
    Binary::start(&[
        ("FLOODGATE_BACKEND", "redis"),
        ("FLOODGATE_REDIS_URL", url),
        ("FLOODGATE_UPSTREAM", "http://127.0.0.1:1"),
    ])
}

fn stop(fg: &mut Binary) -> String {
    fg.signal("TERM");
    let status = fg.wait_exit(patience());
    let stderr = fg.stderr();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
    stderr
}

/// The one error line floodgate logged about `cause`.
fn one_error_naming(stderr: &str, cause: &str) {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    assert!(
        errors[0].contains("redis refuses floodgate") && errors[0].contains(cause),
        "the error names {cause:?}:\n{stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "a password leaked:\n{stderr}");
    assert!(!stderr.contains(NOT_IT), "a password leaked:\n{stderr}");
}

#[test]
fn a_wrong_password_is_a_configuration_error_in_the_log_and_in_readyz() {
    let redis = password_protected();
    let mut fg = start(&format!("redis://:{NOT_IT}@127.0.0.1:{}/", redis.port));

    let body = refused_readyz(&fg);
    assert!(
        body.contains("the user or password in FLOODGATE_REDIS_URL is wrong"),
        "{body}"
    );
    assert!(!body.contains(NOT_IT), "{body}");
    // Fixed on the Redis side: floodgate heals without a restart.
    admin_cli(&redis, &["CONFIG", "SET", "requirepass", NOT_IT]);
    ready_again(&fg);

    let stderr = stop(&mut fg);
    one_error_naming(&stderr, "authentication failed");
}

#[test]
fn a_missing_password_is_a_configuration_error_in_the_log_and_in_readyz() {
    let redis = password_protected();
    let mut fg = start(&redis.url());

    let body = refused_readyz(&fg);
    assert!(body.contains("NOAUTH"), "{body}");
    admin_cli(&redis, &["CONFIG", "SET", "requirepass", ""]);
    ready_again(&fg);

    let stderr = stop(&mut fg);
    one_error_naming(
        &stderr,
        "Redis requires a password and FLOODGATE_REDIS_URL has none",
    );
}

#[test]
fn an_acl_user_without_the_script_is_a_configuration_error_in_the_log_and_in_readyz() {
    let redis = password_protected();
    admin_cli(
        &redis,
        &[
            "ACL",
            "SETUSER",
            "limiter",
            "on",
            ">limiter-pw",
            "~*",
            "+@all",
            "-evalsha",
            "-eval",
            "-script",
        ],
    );
    let mut fg = start(&format!(
        "redis://limiter:limiter-pw@127.0.0.1:{}/",
        redis.port
    ));

    let body = refused_readyz(&fg);
    assert!(body.contains("NOPERM"), "{body}");
    admin_cli(
        &redis,
        &["ACL", "SETUSER", "limiter", "+evalsha", "+script"],
    );
    ready_again(&fg);

    let stderr = stop(&mut fg);
    one_error_naming(&stderr, "NOPERM");
}
