//! Owning a work_dir: one run at a time (a lock file), no stale temporary files, and
//! no fresh run silently written over an earlier one.
//!
//! The lock is `work_dir/.lock`, created exclusively (`O_EXCL`) and holding the
//! owner's process id. A lock whose process is gone (killed with `kill -9`, a power
//! cut) is stale and taken over; where a process's liveness cannot be checked (no
//! `/proc`), a lock is assumed live and the error says which file to remove. The
//! lock is removed when [`WorkDirLock`] is dropped.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Name of the lock file in a work_dir.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive claim on a work_dir; released (the file removed) on drop.
#[derive(Debug)]
pub struct WorkDirLock {
    path: PathBuf,
}

impl WorkDirLock {
    /// Claim `dir` (created if missing) for this process. Another live process's
    /// claim is an error naming the process and the lock file; a dead one's is
    /// taken over.
    pub fn acquire(dir: &Path) -> Result<WorkDirLock> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(LOCK_FILE);
        // Two attempts: the second after removing a stale lock.
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let written = writeln!(f, "{}", std::process::id()).and_then(|_| f.sync_all());
                    if let Err(source) = written {
                        let _ = std::fs::remove_file(&path);
                        return Err(Error::Io { path, source });
                    }
                    return Ok(WorkDirLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let owner = text.trim().parse::<u32>().ok();
                    match owner {
                        Some(pid) if process_alive(pid) => {
                            return Err(Error::Training(format!(
                                "work_dir {} is in use by process {pid} (lock file {}); \
                                 two runs must not share a work_dir. If no such run is \
                                 going on, remove the lock file",
                                dir.display(),
                                path.display()
                            )))
                        }
                        // Dead owner, or a lock file cut short by a crash while it was
                        // being written: stale.
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(source) => return Err(Error::Io { path, source }),
            }
        }
        Err(Error::Training(format!(
            "could not lock work_dir {}: {} keeps reappearing (another run starting?)",
            dir.display(),
            path.display()
        )))
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDirLock {
    fn drop(&mut self) {
        // Only our own lock: a stale-lock takeover by another process must survive.
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            == Some(std::process::id());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether process `pid` exists. Without `/proc` it cannot be told: assume it does,
/// so that a lock is never broken by mistake.
fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    if pid == std::process::id() {
        return true;
    }
    // A zombie (exited, not yet reaped) holds no lock.
    match std::fs::read_to_string(proc.join(pid.to_string()).join("stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether `name` is a temporary file of [`crate::io::write_atomic`]
/// (`.NAME.tmp-PID`).
pub fn is_temp_file(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Remove the temporary files that interrupted atomic writes left in `dir` (a
/// checkpoint write cut by SIGTERM, kill -9 or a full disk). Call it while holding the
/// work_dir's lock: then no other process is writing there. Returns the files removed.
pub fn remove_temp_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Io {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_str().is_some_and(is_temp_file) && e.path().is_file() {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            removed.push(p);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Whether `dir` holds the output of an earlier run (a checkpoint, `latest`, a
/// config or a log), which a fresh run would overwrite or mix with its own.
pub fn has_run_output(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .flatten()
        .any(|e| is_run_output(&e.file_name().to_string_lossy()))
}

/// A file a run writes in its work_dir: checkpoints, `latest`, its config, its logs.
fn is_run_output(name: &str) -> bool {
    name == super::LATEST
        || name == "config.toml"
        || name == "log.txt"
        || name == "log.jsonl"
        || name.ends_with(".safetensors")
}

/// How a run treats a work_dir that already holds an earlier run's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkDirPolicy {
    /// Refuse: the earlier run's checkpoints, config and logs would be mixed with or
    /// replaced by this one's.
    Fresh,
    /// Continue the earlier run (`--resume`).
    Resume,
    /// Delete the earlier run's output first (`--overwrite`).
    Overwrite,
}

/// Lock `dir`, check it against `policy`, clean it: the temporary files of
/// interrupted writes are removed and, under [`WorkDirPolicy::Overwrite`], the
/// earlier run's checkpoints, `latest`, config and logs too. Hold the returned lock
/// for the whole run.
pub fn prepare_work_dir(dir: &Path, policy: WorkDirPolicy) -> Result<WorkDirLock> {
    let lock = WorkDirLock::acquire(dir)?;
    remove_temp_files(dir)?;
    if has_run_output(dir) {
        match policy {
            WorkDirPolicy::Fresh => {
                return Err(Error::Training(format!(
                    "work_dir {} holds an earlier run (checkpoints, latest, config.toml or \
                     logs): pass --resume to continue it or --overwrite to replace it, or \
                     choose another runtime.work_dir",
                    dir.display()
                )))
            }
            WorkDirPolicy::Resume => {}
            WorkDirPolicy::Overwrite => {
                for e in std::fs::read_dir(dir)
                    .map_err(|source| Error::Io {
                        path: dir.to_path_buf(),
                        source,
                    })?
                    .flatten()
                {
                    if is_run_output(&e.file_name().to_string_lossy()) && e.path().is_file() {
                        std::fs::remove_file(e.path()).map_err(|source| Error::Io {
                            path: e.path(),
                            source,
                        })?;
                    }
                }
            }
        }
    }
    Ok(lock)
}
