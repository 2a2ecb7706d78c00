//! floodgate under test: in-process ([`proxy`], so tests can hand it a fake
//! clock or their own backend) or as the real binary ([`Binary`], for
//! configuration errors, signals and resident memory).

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use floodgate::server::{self, Floodgate, Listeners};
use floodgate::settings::Settings;
use floodgate::{Backend, MemoryBackend};
use governor::clock::FakeRelativeClock;

use super::upstream::futures_executor;

pub struct ProxyBuilder {
    env: Vec<(String, String)>,
    clock: Option<FakeRelativeClock>,
}

/// floodgate in this process, forwarding to `upstream`, on a port the OS
/// picks. Two workers, like the benchmark machine.
pub fn proxy(upstream: SocketAddr) -> ProxyBuilder {
    ProxyBuilder {
        env: vec![
            ("FLOODGATE_UPSTREAM".into(), format!("http://{upstream}")),
            ("FLOODGATE_LISTEN".into(), "127.0.0.1:0".into()),
            ("FLOODGATE_ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
            ("FLOODGATE_WORKERS".into(), "2".into()),
        ],
        clock: None,
    }
}

impl ProxyBuilder {
    /// Sets `FLOODGATE_<name>` (pass the full variable name).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn rate(self, rate: &str) -> Self {
        self.env("FLOODGATE_RATE", rate)
    }

    pub fn burst(self, burst: u32) -> Self {
        self.env("FLOODGATE_BURST", &burst.to_string())
    }

    /// Use a memory backend driven by this clock instead of the real one.
    pub fn clock(mut self, clock: FakeRelativeClock) -> Self {
        self.clock = Some(clock);
        self
    }

    pub fn settings(&self) -> Settings {
        Settings::load(self.env.clone()).unwrap_or_else(|e| panic!("test settings invalid:\n{e}"))
    }

    pub fn run(self) -> Proxy {
        let settings = self.settings();
        let floodgate = match self.clock {
            None => Floodgate::new(settings).expect("building floodgate"),
            Some(clock) => {
                let backend: Arc<dyn Backend> =
                    Arc::new(MemoryBackend::with_clock(settings.max_keys, clock));
                Floodgate::with_backend(settings, backend).expect("building floodgate")
            }
        };
        Proxy::start(floodgate)
    }

    /// Runs with a backend the test built.
    pub fn run_with(self, backend: Arc<dyn Backend>) -> Proxy {
        let settings = self.settings();
        Proxy::start(Floodgate::with_backend(settings, backend).expect("building floodgate"))
    }

    /// Builds floodgate without starting it (to keep a handle for reloads),
    /// then starts it.
    pub fn run_floodgate(self) -> (Proxy, Floodgate) {
        let settings = self.settings();
        let floodgate = match self.clock {
            None => Floodgate::new(settings).expect("building floodgate"),
            Some(clock) => {
                let backend: Arc<dyn Backend> =
                    Arc::new(MemoryBackend::with_clock(settings.max_keys, clock));
                Floodgate::with_backend(settings, backend).expect("building floodgate")
            }
        };
        (Proxy::start(floodgate.clone()), floodgate)
    }
}

/// A running in-process floodgate; stopped on drop.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    handles: (ServerHandle, ServerHandle),
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Proxy {
    fn start(floodgate: Floodgate) -> Proxy {
        let listeners = Listeners::bind(&floodgate.settings).expect("binding test listeners");
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let running = server::start(floodgate, listeners)?;
                tx.send((running.addr, running.admin_addr, running.handles()))
                    .unwrap();
                running.wait().await
            })
        });
        let (addr, admin, handles) = rx.recv().expect("floodgate started");
        Proxy {
            addr,
            admin,
            handles,
            thread: Some(thread),
        }
    }
}

/// How long a stopping floodgate under test may take to confirm and end.
/// Past it the test goes on without it (its threads end with the test
/// process) rather than hanging the whole run: the assertions that matter
/// have passed by then.
const STOP_PATIENCE: Duration = Duration::from_secs(10);

impl Drop for Proxy {
    fn drop(&mut self) {
        let (main, admin) = self.handles.clone();
        let (stopped, confirmed) = mpsc::channel();
        std::thread::spawn(move || {
            futures_executor(async move {
                main.stop(false).await;
                admin.stop(false).await;
            });
            let _ = stopped.send(());
        });
        if confirmed.recv_timeout(STOP_PATIENCE).is_err() {
            eprintln!("floodgate under test did not confirm its stop within {STOP_PATIENCE:?}");
        }
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + STOP_PATIENCE;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !thread.is_finished() {
                eprintln!("floodgate under test did not end within {STOP_PATIENCE:?}; leaving it");
                return;
            }
            let joined = thread.join();
            if !std::thread::panicking() {
                joined
                    .expect("floodgate thread panicked")
                    .expect("floodgate failed");
            }
        }
    }
}

// === the real binary ===

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `floodgate` binary as a child process; killed on drop.
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Binary {
    /// `floodgate` with `env` (plus listen/admin on free ports), waiting
    /// until `/healthz` answers.
    pub fn start(env: &[(&str, &str)]) -> Binary {
        Self::start_with_stdout(env, Stdio::null())
    }

    /// As [`start`](Self::start), keeping stdout (the access log) for
    /// [`stop_and_output`](Self::stop_and_output).
    pub fn start_capturing(env: &[(&str, &str)]) -> Binary {
        Self::start_with_stdout(env, Stdio::piped())
    }

    fn start_with_stdout(env: &[(&str, &str)], stdout: Stdio) -> Binary {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Self::command(env);
        cmd.env("FLOODGATE_LISTEN", addr.to_string())
            .env("FLOODGATE_ADMIN_LISTEN", admin.to_string())
            .stdout(stdout)
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawning the floodgate binary");
        let mut binary = Binary { child, addr, admin };
        let deadline = Instant::now() + super::patience();
        loop {
            if floodgate::admin_probe(admin, "/healthz").ok() == Some(200) {
                return binary;
            }
            if let Ok(Some(status)) = binary.child.try_wait() {
                panic!(
                    "floodgate exited with {status} before serving:\n{}",
                    binary.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "floodgate did not answer /healthz in time:\n{}",
                    binary.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The binary with a clean environment plus `env`.
    pub fn command(env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_floodgate"));
        cmd.env_clear().env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`libc` names: "TERM", "INT", "STOP", …).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success());
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything written to stderr so far (only after the process exited,
    /// or it would block; callers use it in failure messages).
    pub fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut out = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut out);
        }
        out
    }

    /// Stops the process with SIGTERM (killing it past [`super::patience`])
    /// and returns its exit status, stdout and stderr. Both are read only
    /// once it has exited, so it suits output smaller than a pipe holds
    /// (64 KiB).
    pub fn stop_and_output(&mut self) -> (Option<std::process::ExitStatus>, String, String) {
        self.signal("TERM");
        let status = self.wait_exit(super::patience());
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        (status, out, self.stderr())
    }

    /// Resident memory high-water mark (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Resident memory now (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
