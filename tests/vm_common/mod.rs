//! What the VM suites (tests/vm_copy.rs, tests/vm_trust.rs, tests/vm_files.rs) share:
//! running the guest's nvcopy with a deadline, handing controllers between vfio-pci and
//! the kernel nvme driver with scripts/setup.sh, and, on the host, comparing image files.
#![allow(dead_code, clippy::unwrap_used)] // each suite uses a part; a panic is the failure report

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Guest side: nvcopy and setup.sh
// ---------------------------------------------------------------------------------------

/// One finished nvcopy process.
pub struct Run {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub secs: f64,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let n = shown.len();
        let tail = if n > 12 {
            shown.truncate(12);
            format!(" ... ({} more arguments)", n - 12)
        } else {
            String::new()
        };
        write!(
            f,
            "`nvcopy {}{tail}` -> {} after {:.1} s\n--- stdout:\n{}--- stderr:\n{}---",
            shown.join(" "),
            self.status,
            self.secs,
            self.stdout,
            self.stderr
        )
    }
}

/// A running nvcopy (the one on PATH: the guest's /bin/nvcopy), its output going to
/// files rather than pipes: nothing can block on a full pipe, and a hung nvcopy is killed
/// with what it printed so far.
pub struct Proc {
    pub args: Vec<String>,
    pub child: Child,
    pub out: PathBuf,
    pub err: PathBuf,
    pub started: Instant,
}

impl Proc {
    /// Starts nvcopy with `args`; `tag` names its output files in the temp directory.
    pub fn spawn(args: &[String], tag: &str) -> Proc {
        let dir = std::env::temp_dir();
        let out = dir.join(format!("nvcopy-{tag}.out"));
        let err = dir.join(format!("nvcopy-{tag}.err"));
        let child = Command::new("nvcopy")
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting nvcopy: {e}"));
        Proc {
            args: args.to_vec(),
            child,
            out,
            err,
            started: Instant::now(),
        }
    }

    /// The finished process, with `status`.
    pub fn run(&self, status: ExitStatus) -> Run {
        let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
        let run = Run {
            args: self.args.clone(),
            status,
            stdout: read(&self.out),
            stderr: read(&self.err),
            secs: self.started.elapsed().as_secs_f64(),
        };
        // Shown with --nocapture, and for failed tests.
        let line: Vec<&str> = run.args.iter().take(8).map(String::as_str).collect();
        eprintln!(
            "{:6.1} s  {}  nvcopy {}",
            run.secs,
            run.status,
            line.join(" ")
        );
        run
    }

    /// What the process printed so far (for failure messages).
    pub fn so_far(&self) -> String {
        let out = std::fs::read_to_string(&self.out).unwrap_or_default();
        let err = std::fs::read_to_string(&self.err).unwrap_or_default();
        format!(
            "`nvcopy {}` after {:.1} s\n--- stdout:\n{out}--- stderr:\n{err}---",
            self.args.join(" "),
            self.started.elapsed().as_secs_f64()
        )
    }

    /// Waits for the process to end, killing it (and failing) after `limit`.
    pub fn wait(mut self, limit: Duration) -> Run {
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return self.run(st);
            }
            if self.started.elapsed() > limit {
                let _ = self.child.kill();
                let st = self.child.wait().unwrap();
                panic!("killed after {limit:?}: {}", self.run(st));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs nvcopy, killing it (and failing) after `limit`.
pub fn nvcopy_for(args: &[String], limit: Duration) -> Run {
    Proc::spawn(args, &std::process::id().to_string()).wait(limit)
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Runs nvcopy and requires success.
pub fn ok(args: &[String], limit: Duration) -> Run {
    let run = nvcopy_for(args, limit);
    assert!(run.status.success(), "expected success: {run}");
    run
}

/// Runs scripts/setup.sh (/bin/setup.sh in the guest), which must succeed; its stdout.
pub fn setup_sh(args: &[&str]) -> String {
    let out = Command::new("setup.sh").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "setup.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs scripts/nvmet-setup.sh (/bin/nvmet-setup.sh in the guest), which must succeed;
/// what it printed.
pub fn nvmet(args: &[&str]) -> String {
    let out = Command::new("nvmet-setup.sh").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "nvmet-setup.sh {args:?}: {text}");
    text
}

/// The driver `bdf` is bound to, if any.
pub fn driver_of(bdf: &str) -> Option<String> {
    std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Waits (a little) for `bdf` to be bound to `driver`.
pub fn wait_for_driver(bdf: &str, driver: &str) {
    let t = Instant::now();
    while driver_of(bdf).as_deref() != Some(driver) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{bdf} is bound to {:?}, not {driver}",
            driver_of(bdf)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Hands a controller to the kernel nvme driver for as long as it lives.
pub struct OnKernelDriver(&'static str);

impl OnKernelDriver {
    pub fn new(bdf: &'static str) -> Self {
        setup_sh(&["reset", bdf]);
        wait_for_driver(bdf, "nvme");
        OnKernelDriver(bdf)
    }

    /// The block device of its namespace 1, e.g. /dev/nvme0n1, once the kernel made it.
    pub fn blockdev(&self) -> String {
        setup_sh(&["blockdev", self.0]).trim().to_string()
    }
}

impl Drop for OnKernelDriver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Best effort: a second panic would abort the whole suite.
            let _ = Command::new("setup.sh").args(["bind", self.0]).status();
            return;
        }
        setup_sh(&["bind", self.0]);
        wait_for_driver(self.0, "vfio-pci");
    }
}

/// The summary `--json` printed.
pub fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {run}"))
}

// ---------------------------------------------------------------------------------------
// Host side: the images after the guest exited
// ---------------------------------------------------------------------------------------

/// Reads `len` bytes at `at` of the file.
pub fn read_at(path: &Path, at: u64, len: u64) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// The first offset where `got` and `want` differ, if any.
pub fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).position(|(a, b)| a != b)
}
