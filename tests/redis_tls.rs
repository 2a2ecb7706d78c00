//! `rediss://` with a password: floodgate talks TLS to a Redis that requires
//! it, verifies the server's certificate against the CA it is given
//! (`SSL_CERT_FILE`, as any rustls-native-certs program), authenticates, and
//! never logs the password. The test makes its own CA with `openssl` and runs
//! its own `redis-server` with TLS on a random loopback port.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Binary, request, upstream};

const PASSWORD: &str = "hunter2-tls";

fn openssl(dir: &Path, args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}); this test needs the openssl command")
        });
    assert!(status.success(), "openssl {args:?} failed");
}

/// A CA and a server certificate for 127.0.0.1, signed by it.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=floodgate test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsRedis {
    fn start(dir: &Path) -> TlsRedis {
        let port = support::proxy::free_port();
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.pem",
            ])
            .args([
                "--tls-auth-clients",
                "no",
                "--requirepass",
                PASSWORD,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--logfile", "redis.log"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {bin}: {e}; install redis-server or set REDIS_SERVER_BIN")
            });
        let redis = TlsRedis { child, port };
        support::eventually("redis-server answering over TLS", || {
            (redis.cli(dir, &["PING"]).as_deref() == Some("PONG")).then_some(())
        });
        redis
    }

    fn cli(&self, dir: &Path, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args([
                "--tls",
                "--cacert",
                "ca.pem",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
            ])
            .args(["-a", PASSWORD, "--no-auth-warning"])
            .args(args)
            .current_dir(dir)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

#[test]
fn rediss_with_a_password_limits_through_tls_and_never_logs_the_password() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let redis = TlsRedis::start(dir.path());
    let up = upstream().run();
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}/", redis.port);
    let ca = dir.path().join("ca.pem");
    let mut fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
        ("FLOODGATE_BACKEND", "redis"),
        ("FLOODGATE_REDIS_URL", &url),
        ("FLOODGATE_REDIS_FAILURE", "closed"),
        ("FLOODGATE_RATE", "2/h"),
        ("SSL_CERT_FILE", ca.to_str().unwrap()),
    ]);
    let deadline = Instant::now() + support::patience();
    loop {
        let res = request(fg.admin, "GET", "/readyz", &[], b"");
        if res.status == 200 && res.text().starts_with("ready: redis backend") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never ready over TLS: {} {}",
            res.status,
            res.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let statuses: Vec<u16> = (0..3)
        .map(|_| request(fg.addr, "GET", "/", &[], b"").status)
        .collect();
    assert_eq!(statuses, vec![200, 200, 429]);
    let keys = redis
        .cli(dir.path(), &["--scan", "--pattern", "floodgate:*"])
        .unwrap_or_default();
    assert_eq!(
        keys, "floodgate:{ip:127.0.0.1}:default",
        "the decision was made in Redis"
    );
    fg.signal("TERM");
    let stderr = fg.stderr();
    assert!(
        stderr.contains("connected to redis rediss://:***@127.0.0.1"),
        "{stderr}"
    );
    assert!(!stderr.contains(PASSWORD), "the password leaked:\n{stderr}");
}

#[test]
fn an_untrusted_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let redis = TlsRedis::start(dir.path());
    let up = upstream().run();
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}/", redis.port);
    // No SSL_CERT_FILE: the system's CAs do not know the test CA.
    let fg = Binary::start(&[
        ("FLOODGATE_UPSTREAM", &format!("http://{}", up.addr())),
        ("FLOODGATE_BACKEND", "redis"),
        ("FLOODGATE_REDIS_URL", &url),
        ("FLOODGATE_REDIS_FAILURE", "closed"),
    ]);
    support::eventually("/readyz reporting redis unavailable", || {
        let res = request(fg.admin, "GET", "/readyz", &[], b"");
        (res.status == 503 && res.text().contains("redis unavailable")).then_some(())
    });
    let res = request(fg.addr, "GET", "/", &[], b"");
    assert_eq!(
        res.status, 503,
        "closed policy while Redis cannot be trusted"
    );
    assert!(
        redis
            .cli(dir.path(), &["--scan"])
            .unwrap_or_default()
            .is_empty()
    );
}
