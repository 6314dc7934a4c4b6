//! Files in directories that a job's owner can write (the job directory), handled by a daemon
//! that may run as root.
//!
//! A job directory belongs to the job's owner, so while the daemon is not looking the owner can
//! replace any entry in it with a symbolic link (to `/etc/shadow`, say), a hard link, a FIFO or
//! a device. Path-based calls would then let the daemon read, append to, `chown` or `chmod` the
//! target with its own rights. Everything here works on handles instead: names are opened
//! with `O_NOFOLLOW` (a final symlink fails with `ELOOP`), reads use `O_NONBLOCK` (opening a
//! FIFO never waits for a writer), the handle is checked to be a plain file (or directory) with
//! one link, and ownership and modes are changed through the handle (`fchown`, `fchmod`), never
//! by path. The directory's own path is the daemon's (its parent is the daemon's `jobs/`), so
//! only the last component needs this care.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::libc;

/// Whose files these are: `(uid, gid)` to give new files and directories to (a root daemon's
/// jobs), or `None` to leave them to the daemon's own user.
pub type Owner = Option<(u32, u32)>;

fn refused(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{}: {what}; refusing to use it", path.display()),
    )
}

/// Maps `ELOOP` from an `O_NOFOLLOW` open to an error that says what happened.
fn no_follow_error(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        refused(path, "is a symbolic link")
    } else {
        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    }
}

/// Checks an opened handle: a regular file with one link (a hard link to someone else's file
/// has two).
fn check_regular(file: &File, path: &Path) -> io::Result<std::fs::Metadata> {
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(refused(path, "is not a regular file"));
    }
    if meta.nlink() > 1 {
        return Err(refused(path, "has more than one hard link"));
    }
    Ok(meta)
}

fn give(file: &File, owner: Owner, path: &Path) -> io::Result<()> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid)).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot chown {}: {e}", path.display()))
        })?;
    }
    Ok(())
}

/// Opens `path` for appending, creating it (mode 0640) if missing, and gives it to `owner`.
/// Refuses a symlink, a hard link and anything but a regular file.
pub fn open_append(path: &Path, owner: Owner) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| no_follow_error(path, e))?;
    check_regular(&file, path)?;
    give(&file, owner, path)?;
    // O_NONBLOCK was only for the open (a FIFO would wait for a reader); the handle becomes
    // a job's stdout or stderr, which should see an ordinary file.
    let flags = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) - nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(file)
}

/// Writes `path` so that it is never seen half-written (temp file, fsync, rename), the temp
/// file created fresh (`O_EXCL`: never through a link someone planted) and given to `owner`.
pub fn write_atomic(path: &Path, bytes: &[u8], owner: Owner) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let err =
        |e: io::Error| io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()));
    // `unlink` removes a planted link itself, never its target.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    give(&f, owner, &tmp)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Makes sure `path` is a directory (creating it if missing) with `mode`, given to `owner`.
/// Refuses a symlink or anything but a directory in its place.
pub fn ensure_dir(path: &Path, mode: u32, owner: Owner) -> io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", path.display()),
            ));
        }
        _ => {}
    }
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(path)
        .map_err(|e| {
            // With O_DIRECTORY, a final symlink fails with ENOTDIR, not ELOOP.
            let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink());
            match e.raw_os_error() {
                Some(libc::ENOTDIR) if link => refused(path, "is a symbolic link"),
                Some(libc::ENOTDIR) => refused(path, "is not a directory"),
                _ => no_follow_error(path, e),
            }
        })?;
    dir.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot chmod {}: {e}", path.display())))?;
    give(&dir, owner, path)
}

/// Opens `path` for reading only if it is a regular file (not a symlink, FIFO, device or hard
/// link), without ever blocking on the open.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| no_follow_error(path, e))?;
    check_regular(&file, path)?;
    Ok(file)
}

/// Opens `path` for reading only if it is a regular file, following symbolic links (a model
/// directory in the Hugging Face cache links its files to blobs; a root daemon reads them
/// with the owner's rights), without ever blocking on the open (a FIFO).
pub fn open_linked_regular(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// What a file was when read (size, inode, change time): a check of its contents may be
/// reused while these stay the same (a sweep's jobs name the same files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    inode: u64,
    changed: (i64, i64),
}

impl FileStamp {
    /// The stamp of a file's metadata.
    pub fn from_metadata(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            len: m.len(),
            inode: m.ino(),
            changed: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// The stamp of `path` (links followed), `None` if it cannot be seen.
    pub fn of(path: &Path) -> Option<Self> {
        std::fs::metadata(path)
            .ok()
            .map(|m| Self::from_metadata(&m))
    }
}

/// Reads a whole file with [`open_linked_regular`]'s checks, if it holds at most `max` bytes.
pub fn read_linked_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    read_capped(open_linked_regular(path)?, path, max)
}

/// Reads a whole file with [`open_regular`]'s checks, if it holds at most `max` bytes: the
/// files jobd reads from job directories are their owners', who could otherwise make the
/// daemon read gigabytes (a sparse file costs them nothing).
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    read_capped(open_regular(path)?, path, max)
}

/// Reads `file` (opened from `path`) whole if it holds at most `max` bytes.
fn read_capped(file: File, path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let len = file.metadata()?.len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {len} bytes, more than the {max} jobd reads of it",
                path.display()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // It may grow meanwhile: never past the limit.
    file.take(max).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The last `max` bytes of a file, from its first line that starts within them (all of it
/// when it is shorter), with [`open_regular`]'s checks; and whether the start was cut.
pub fn read_regular_tail(path: &Path, max: u64) -> io::Result<(Vec<u8>, bool)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = open_regular(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    if start > 0 {
        let from = bytes
            .iter()
            .position(|b| *b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
        bytes.drain(..from);
    }
    Ok((bytes, start > 0))
}

/// Whether `path` is a real directory (not a symlink to one).
pub fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// A Unix account whose file access rights a thread can take for a while: see
/// [`Credentials::enter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// While alive, the calling thread opens files with another account's rights; dropping it
/// restores the thread's own. Made by [`Credentials::enter`].
#[derive(Debug)]
pub struct AsAccount {
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
}

/// Sets the calling thread's supplementary groups. The raw system call changes only this
/// thread (glibc's `setgroups` changes every thread of the process).
fn set_thread_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live slice of gid_t.
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Credentials {
    /// Gives the calling thread (only) this account's filesystem rights — its `fsuid`, `fsgid`
    /// and supplementary groups, as an NFS or Samba server does per request — so that files a
    /// root daemon reads on a user's behalf (a job's model) are read with the user's rights,
    /// whatever links the user planted. The kernel drops root's file capabilities while the
    /// fsuid is not 0. Only a root daemon can do this; checked, not assumed. Threads started
    /// while it holds inherit these rights, so do not start any.
    pub fn enter(&self) -> io::Result<AsAccount> {
        use nix::unistd::{Gid, Uid, setfsgid, setfsuid};
        let saved = AsAccount {
            // An invalid id (-1) changes nothing and returns the current one.
            uid: setfsuid(Uid::from_raw(u32::MAX)).as_raw(),
            gid: setfsgid(Gid::from_raw(u32::MAX)).as_raw(),
            groups: nix::unistd::getgroups()
                .map_err(io::Error::from)?
                .into_iter()
                .map(Gid::as_raw)
                .collect(),
        };
        let groups: Vec<libc::gid_t> = self.groups.clone();
        set_thread_groups(&groups)?;
        // From here on `saved` restores whatever was changed when it drops.
        setfsgid(Gid::from_raw(self.gid));
        setfsuid(Uid::from_raw(self.uid));
        let now_uid = setfsuid(Uid::from_raw(u32::MAX)).as_raw();
        let now_gid = setfsgid(Gid::from_raw(u32::MAX)).as_raw();
        if (now_uid, now_gid) != (self.uid, self.gid) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "cannot take the file rights of uid {} gid {} (only a root daemon can)",
                    self.uid, self.gid
                ),
            ));
        }
        Ok(saved)
    }
}

impl Drop for AsAccount {
    fn drop(&mut self) {
        use nix::unistd::{Gid, Uid, setfsgid, setfsuid};
        setfsuid(Uid::from_raw(self.uid));
        setfsgid(Gid::from_raw(self.gid));
        if let Err(e) = set_thread_groups(&self.groups) {
            tracing::error!(error = %e, "cannot restore this thread's supplementary groups");
        }
    }
}

/// This thread's file-system uid (0 for root's own file rights; a user's inside
/// [`Credentials::enter`]).
pub fn current_fsuid() -> u32 {
    // An invalid id (-1) changes nothing and returns the current one.
    nix::unistd::setfsuid(nix::unistd::Uid::from_raw(u32::MAX)).as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn victim(dir: &Path) -> std::path::PathBuf {
        let v = dir.join("victim");
        std::fs::write(&v, b"secret\n").unwrap();
        std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o600)).unwrap();
        v
    }

    fn unchanged(v: &Path) {
        assert_eq!(std::fs::read(v).unwrap(), b"secret\n");
        let m = std::fs::metadata(v).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn planted_symlinks_are_refused_and_their_targets_untouched() {
        let t = tempfile::tempdir().unwrap();
        let v = victim(t.path());
        let vdir = t.path().join("victim-dir");
        std::fs::create_dir(&vdir).unwrap();
        std::fs::set_permissions(&vdir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let job = t.path().join("job");
        std::fs::create_dir(&job).unwrap();
        for name in ["stdout.log", "metrics.jsonl", "job.tmp"] {
            symlink(&v, job.join(name)).unwrap();
        }
        symlink(&vdir, job.join("output")).unwrap();

        let e = open_append(&job.join("stdout.log"), None).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        let e = open_regular(&job.join("metrics.jsonl")).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        let e = ensure_dir(&job.join("output"), 0o755, None).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        // The planted temp link is removed (not followed) and the file written fresh.
        write_atomic(&job.join("job.toml"), b"kind = \"command\"\n", None).unwrap();
        assert_eq!(
            std::fs::read(job.join("job.toml")).unwrap(),
            b"kind = \"command\"\n"
        );
        unchanged(&v);
        assert_eq!(
            std::fs::metadata(&vdir).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn hard_links_fifos_and_directories_are_not_read_or_appended() {
        let t = tempfile::tempdir().unwrap();
        let v = victim(t.path());
        std::fs::hard_link(&v, t.path().join("linked")).unwrap();
        let e = open_regular(&t.path().join("linked")).unwrap_err();
        assert!(e.to_string().contains("more than one hard link"), "{e}");
        let e = open_append(&t.path().join("linked"), None).unwrap_err();
        assert!(e.to_string().contains("more than one hard link"), "{e}");
        unchanged(&v);

        let fifo = t.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Returns at once (a blocking open would wait for a writer forever).
        let e = open_regular(&fifo).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = open_regular(t.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = ensure_dir(&v, 0o755, None).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    /// As root: a root-only file is out of reach while the thread has another account's
    /// rights (even through the group root is in), other threads keep root's, and dropping
    /// the guard gives them back. Skipped when not root (nothing to drop then).
    #[test]
    fn a_thread_can_read_with_another_accounts_rights_only() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let v = victim(t.path());
        std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::fs::write(t.path().join("public"), b"hello").unwrap();
        std::fs::set_permissions(
            t.path().join("public"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let nobody = Credentials {
            uid: 65534,
            gid: 65534,
            groups: vec![65534],
        };
        // A thread that exists already (a new one would inherit the rights of its creator).
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn({
            let v = v.clone();
            move || {
                wait.recv().unwrap();
                std::fs::read(v).is_ok()
            }
        });
        let guard = nobody.enter().unwrap();
        let e = std::fs::read(&v).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert_eq!(std::fs::read(t.path().join("public")).unwrap(), b"hello");
        go.send(()).unwrap();
        assert!(other.join().unwrap(), "other threads keep their rights");
        drop(guard);
        assert_eq!(std::fs::read(&v).unwrap(), b"secret\n");
    }

    #[test]
    fn plain_files_and_directories_work() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("stdout.log");
        let mut first = open_append(&log, None).unwrap();
        let flags = nix::fcntl::fcntl(&first, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(
            flags & libc::O_NONBLOCK,
            0,
            "a job's stdout is an ordinary file"
        );
        assert_ne!(flags & libc::O_APPEND, 0);
        first.write_all(b"one\n").unwrap();
        open_append(&log, None)
            .unwrap()
            .write_all(b"two\n")
            .unwrap();
        assert_eq!(read_regular(&log, 100).unwrap(), b"one\ntwo\n");
        assert!(read_regular(&log, 4).is_err());
        assert_eq!(
            read_regular_tail(&log, 6).unwrap(),
            (b"two\n".to_vec(), true)
        );
        assert_eq!(
            read_regular_tail(&log, 100).unwrap(),
            (b"one\ntwo\n".to_vec(), false)
        );
        let out = t.path().join("output");
        ensure_dir(&out, 0o750, None).unwrap();
        ensure_dir(&out, 0o755, None).unwrap();
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(is_real_dir(&out) && !is_real_dir(&log));
    }
}
