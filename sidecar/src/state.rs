//! The state directory: Airlock's private files (the queue and its `-wal`/`-shm`,
//! the signing key, the reviewer tokens, the review endpoint's address, the default
//! SQLite target). The agent must neither read nor change any of them.
//!
//! # Rules (checked by every command that opens the state directory)
//! - Created with mode 0700 when missing (and its missing parents too).
//! - Refused when it is not a directory, is owned by a user other than the one
//!   running Airlock, or is writable by group or others: whoever can write to it can
//!   replace the queue or plant links that make Airlock write elsewhere. Symbolic
//!   links leading to it are followed: the directory is the operator's, not the
//!   agent's, and the checks apply to the directory they lead to.
//! - Every file Airlock creates in it is mode 0600, without relying on the umask:
//!   files are opened with an explicit mode. SQLite creates `queue.db-wal` and
//!   `queue.db-shm` with the mode of `queue.db`, so `queue.db` is created 0600 before
//!   SQLite opens it, and an older, looser one is tightened (by path: see
//!   [`private_file`] for why those files are never opened here).
//!
//! Directories outside the state directory (the results directory in particular)
//! are the agent's: see [`crate::outcome`] for how Airlock writes there.

use std::fs::{self, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Creates the state directory `dir` (mode 0700) if it is missing, then checks it
/// (see the module docs). The error says what is wrong, not where: callers name the
/// directory.
pub fn prepare(dir: &Path) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(_) => {}
        Err(error) if error.kind() == ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        Err(error) => return Err(error),
    }
    check(dir)
}

/// Checks an existing state directory: a directory, owned by the user running
/// Airlock, not writable by group or others.
pub fn check(dir: &Path) -> io::Result<()> {
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "is not a directory",
        ));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "is owned by uid {}, not by the user running Airlock (uid {me}); \
                 whoever owns it can replace the queue: chown it to uid {me}",
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "is writable by group or others (mode {mode:04o}); anyone who can write \
                 to it can replace the queue or the keys: run `chmod 700` on it"
            ),
        ));
    }
    Ok(())
}

/// Creates `path` empty with mode 0600 if it is missing, and takes group and other
/// permissions away from it if it exists with them (a file from an older Airlock).
/// Used for files another library creates (SQLite databases), so they start private.
///
/// An existing file is never opened, only changed by path: closing any descriptor
/// of a file drops every POSIX lock this process holds on it, which would release
/// the locks of the process's own SQLite connections to the same database (and let
/// another process truncate the shared memory they map).
pub fn private_file(path: &Path) -> io::Result<()> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_new) => Ok(()),
        Err(error) if error.kind() == ErrorKind::AlreadyExists => tighten(path),
        Err(error) => Err(error),
    }
}

/// Like [`private_file`], but only for a file that already exists (SQLite's `-wal`
/// and `-shm` of a database created by an older Airlock).
pub fn tighten_if_present(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => tighten(path),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    }
}

fn tighten(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` with mode 0600, atomically: into a new temporary file
/// beside it (`write_private_temp`), then renamed over `path`. A crash leaves the
/// old file or the new one. Missing parent directories are created with mode 0700.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent_of(path))?;
    let tmp = write_private_temp(path, bytes)?;
    let renamed = fs::rename(&tmp, path);
    if renamed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    renamed
}

/// Writes `bytes`, flushed, into a new file with mode 0600 beside `path`, under an
/// unpredictable name (never an existing file, never through a link), and returns
/// its path for the caller to move into place.
pub(crate) fn write_private_temp(path: &Path, bytes: &[u8]) -> io::Result<PathBuf> {
    write_temp(path, bytes, 0o600)
}

/// Writes `bytes`, flushed, into a new dotfile beside `path` named
/// `.<name>.<random>.tmp` with `mode` (less the umask): `O_CREAT|O_EXCL` never
/// opens an existing file nor follows a link planted under the name. Returns its
/// path for the caller to move into place; on an error nothing is left behind.
pub(crate) fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(ErrorKind::InvalidInput, "the path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", random_hex()?));
    let tmp = parent_of(path).join(tmp_name);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        });
    match written {
        Ok(()) => Ok(tmp),
        Err(error) => {
            let _ = fs::remove_file(&tmp);
            Err(error)
        }
    }
}

/// The directory `path` is in (`.` for a bare name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// 16 random bytes as hex: temporary names the agent cannot predict.
pub(crate) fn random_hex() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(hex::encode(bytes))
}

/// The SQLite file of a `sqlite://` target URL, if it is one.
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    url.strip_prefix("sqlite://")
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_private_and_refuses_open_directories() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("a/state");
        prepare(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
        let err = prepare(&state).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        assert!(err.contains("0777"), "{err}");
        fs::set_permissions(&state, fs::Permissions::from_mode(0o750)).unwrap();
        prepare(&state).unwrap();
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let err = prepare(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        private_file(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        private_file(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let wal = dir.path().join("queue.db-wal");
        tighten_if_present(&wal).unwrap();
        assert!(!wal.exists());

        let tokens = dir.path().join("sub/tokens.toml");
        write_private(&tokens, b"one").unwrap();
        write_private(&tokens, b"two").unwrap();
        assert_eq!(fs::read(&tokens).unwrap(), b"two");
        assert_eq!(mode(&tokens), 0o600);
        assert_eq!(mode(&dir.path().join("sub")), 0o700);
        assert_eq!(fs::read_dir(dir.path().join("sub")).unwrap().count(), 1);
    }
}
