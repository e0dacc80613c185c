//! Child processes that never outlive the test.
//!
//! Two layers: a [`ChildGuard`] kills and waits for its process on drop (normal end and panics,
//! which unwind), and every child is started through `setpriv --pdeathsig KILL`, so the kernel
//! kills it when its parent goes away (abort, `kill -9` of the test binary). The parent-death
//! signal fires when the *thread* that forked exits, so all spawns happen on one dedicated thread
//! that lives as long as the process.

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use crate::{Error, Result};

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // Keep the forking thread alive until the process exits.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn the child-spawner thread");
        Mutex::new(tx)
    })
}

/// A running child process; killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Starts `program args...` with stdout/stderr appended to `log` (if given).
    pub fn spawn(
        name: &str,
        program: &std::path::Path,
        args: &[String],
        log: Option<&std::path::Path>,
    ) -> Result<Self> {
        let mut cmd = Command::new("setpriv");
        cmd.arg("--pdeathsig")
            .arg("KILL")
            .arg("--")
            .arg(program)
            .args(args);
        cmd.stdin(Stdio::null());
        match log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                cmd.stdout(file.try_clone()?).stderr(file);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        Self::spawn_command(name, cmd)
    }

    /// Starts a fully prepared command (which should already go through `setpriv --pdeathsig`,
    /// see [`pdeath_command`]).
    pub fn spawn_command(name: &str, cmd: Command) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        spawner()
            .lock()
            .expect("spawner lock")
            .send((cmd, tx))
            .expect("spawner thread alive");
        let child = rx
            .recv()
            .expect("spawner replies")
            .map_err(|source| Error::Spawn {
                what: name.to_string(),
                source,
            })?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Errors if the process has already exited (used while waiting for readiness).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            return Err(Error::Exited(self.name.clone(), status.to_string()));
        }
        Ok(())
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, `KILL`) with the `kill` command.
    pub fn signal(&self, signal: &str) -> Result<()> {
        run("kill", &[format!("-{signal}"), self.id().to_string()]).map(|_| ())
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit by itself, up to `timeout`; returns its exit status.
    pub fn wait_timeout(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<Option<std::process::ExitStatus>> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Ok(Some(status));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(None)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `Command` that runs `program` under `setpriv --pdeathsig KILL`, for callers that need to set
/// environment variables or working directories before [`ChildGuard::spawn_command`].
pub fn pdeath_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg("--pdeathsig").arg("KILL").arg("--").arg(program);
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs a short command to completion and returns its stdout; errors carry stdout+stderr.
pub fn run(program: impl AsRef<std::ffi::OsStr>, args: &[String]) -> Result<String> {
    let program = program.as_ref();
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            what: program.to_string_lossy().into_owned(),
            source,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!("{} {}", program.to_string_lossy(), args.join(" ")),
            output: text,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
