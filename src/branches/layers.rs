//! Copy-on-write forks: a branch directory as an overlayfs mount over frozen, shared layers.
//!
//! Forking a branch at its head copies nothing. The parent's current tree becomes a read-only
//! layer, and parent and fork each go on in a fresh, empty upper directory stacked over it (the
//! kernel's overlayfs). A fork of 20,000 files costs a rename and two mounts, and no disk until
//! one side writes; git's objects, the work tree, untracked files and dependency directories are
//! all shared. Mounting needs CAP_SYS_ADMIN (root on a Fly machine); where the kernel refuses, or
//! `FORK_MODE=copy`, forks are copies ([`crate::git::fork`]).
//!
//! On disk, on the workspace volume:
//!
//! ```text
//! {WORKSPACE_BASE}/.weldr-layers/
//!     lock                         flock: one layer change at a time, across processes
//!     layers/{id}/                 frozen trees, never written once they are layers
//!     branches/{project}/{branch}/
//!         stack                    the branch's layer ids, top first, one per line
//!         upper/ work/             the branch's own changes, overlayfs' scratch directory
//! ```
//!
//! The stack file is the truth and is written (atomically) before any directory moves, so every
//! step a crash interrupts is finished by [`mount_branch`]: a stack whose top layer does not exist
//! yet means "freeze": the branch's upper directory (or, for a branch that was a plain directory,
//! the directory itself) is renamed into that layer. Nothing is ever copied or deleted to get
//! there, so no crash loses a file. Mounts do not survive a reboot; [`mount_all`] restores them
//! when the store is opened, before anything reads a branch.
//!
//! Freezing never happens under a live writer: an overlay that is in use refuses to unmount
//! (EBUSY), and a plain directory is converted only when no process has it as its working
//! directory or holds a file in it open (and, checked by the caller, no workflow runs on it).

use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::config::Config;

/// A stack deeper than this is not extended: the fork is a copy instead. The kernel takes at most
/// a page of mount options, and every layer costs each lookup a little.
pub const MAX_DEPTH: usize = 32;

/// Why a layered fork was not made; the caller copies instead.
#[derive(Debug)]
pub enum Declined {
    /// The kernel refuses overlay mounts here (no privilege, no overlayfs, unsupported fs).
    Unavailable,
    /// A process uses the parent's directory, so it cannot be frozen now.
    Busy,
    /// The parent's stack is already [`MAX_DEPTH`] deep.
    TooDeep,
}

/// The layer area of a workspace.
pub struct Layers {
    root: PathBuf,
}

impl Layers {
    pub fn new(config: &Config) -> Self {
        Self {
            root: config.workspace_base.join(".weldr-layers"),
        }
    }

    fn layer(&self, id: &str) -> PathBuf {
        self.root.join("layers").join(id)
    }

    fn state(&self, project_id: &str, branch_id: &str) -> PathBuf {
        self.root.join("branches").join(project_id).join(branch_id)
    }

    /// Whether the branch lives in layers (its directory is, or is to be, an overlay mount).
    pub fn is_layered(&self, project_id: &str, branch_id: &str) -> bool {
        self.state(project_id, branch_id).join("stack").exists()
    }

    fn read_stack(&self, project_id: &str, branch_id: &str) -> io::Result<Option<Vec<String>>> {
        match fs::read_to_string(self.state(project_id, branch_id).join("stack")) {
            Ok(text) => Ok(Some(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect(),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replace the stack file atomically (write, fsync, rename, fsync the directory).
    fn write_stack(&self, project_id: &str, branch_id: &str, stack: &[String]) -> io::Result<()> {
        let dir = self.state(project_id, branch_id);
        fs::create_dir_all(&dir)?;
        let tmp = dir.join("stack.tmp");
        let mut f = fs::File::create(&tmp)?;
        for id in stack {
            writeln!(f, "{id}")?;
        }
        f.sync_all()?;
        fs::rename(&tmp, dir.join("stack"))?;
        fs::File::open(&dir)?.sync_all()
    }

    /// Take the layer lock (blocks). Held for the duration of one change.
    fn lock(&self) -> io::Result<fs::File> {
        fs::create_dir_all(&self.root)?;
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join("lock"))?;
        // flock(LOCK_EX), released when the file is closed.
        f.lock()?;
        Ok(f)
    }

    /// Whether this machine can mount overlays over this workspace: tried once per workspace
    /// with a throwaway mount.
    pub fn available(&self) -> bool {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        static SEEN: OnceLock<Mutex<HashMap<PathBuf, bool>>> = OnceLock::new();
        let seen = SEEN.get_or_init(Default::default);
        if let Some(known) = seen
            .lock()
            .map(|m| m.get(&self.root).copied())
            .ok()
            .flatten()
        {
            return known;
        }
        let ok = self.probe().is_ok();
        if !ok {
            tracing::info!(root = %self.root.display(), "overlayfs cannot be mounted here; forks are copies");
        }
        if let Ok(mut m) = seen.lock() {
            m.insert(self.root.clone(), ok);
        }
        ok
    }

    fn probe(&self) -> io::Result<()> {
        let dir = self.root.join(format!("probe-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["l", "u", "w", "m"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let mounted = mount_overlay(
            &dir.join("m"),
            &[dir.join("l")],
            &dir.join("u"),
            &dir.join("w"),
        );
        if mounted.is_ok() {
            let _ = unmount(&dir.join("m"), false);
        }
        let _ = fs::remove_dir_all(&dir);
        mounted
    }

    /// Fork `parent` (whose directory is `parent_dir`) into `child` at `child_dir` as layers:
    /// freeze the parent's tree into a layer and mount both over it. `Ok(Err(..))` when it
    /// cannot be done now; nothing has changed then and the caller copies instead.
    pub fn fork(
        &self,
        project_id: &str,
        parent: (&str, &Path),
        child: (&str, &Path),
    ) -> io::Result<Result<(), Declined>> {
        if !self.available() {
            return Ok(Err(Declined::Unavailable));
        }
        let (parent_id, parent_dir) = parent;
        let (child_id, child_dir) = child;
        if !is_empty_dir(child_dir)? || self.is_layered(project_id, child_id) {
            return Err(invalid(format!(
                "{} exists and is not empty",
                child_dir.display()
            )));
        }
        let _lock = self.lock()?;
        let stack = match self.read_stack(project_id, parent_id)? {
            Some(stack) => {
                self.mount_locked(project_id, parent_id, parent_dir)?;
                if stack.len() >= MAX_DEPTH {
                    return Ok(Err(Declined::TooDeep));
                }
                if is_empty_dir(&self.state(project_id, parent_id).join("upper"))? {
                    // Nothing written since the last freeze: the layers are already the tree.
                    stack
                } else {
                    // An overlay in use refuses to unmount: then it is not frozen now. The
                    // server's own brief reads (a push walking the tree after a version) end
                    // within moments, so a few short waits come first.
                    let mut tries = 0;
                    loop {
                        match unmount(parent_dir, false) {
                            Ok(()) => break,
                            Err(e) if e.kind() == io::ErrorKind::ResourceBusy && tries < 20 => {
                                tries += 1;
                                std::thread::sleep(std::time::Duration::from_millis(25));
                            }
                            Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                                return Ok(Err(Declined::Busy));
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    let mut next = vec![new_layer_id()];
                    next.extend(stack);
                    self.write_stack(project_id, parent_id, &next)?;
                    self.mount_locked(project_id, parent_id, parent_dir)?;
                    next
                }
            }
            None => {
                if in_use(parent_dir)? {
                    return Ok(Err(Declined::Busy));
                }
                self.clear_stale_state(project_id, parent_id)?;
                let next = vec![new_layer_id()];
                self.write_stack(project_id, parent_id, &next)?;
                self.mount_locked(project_id, parent_id, parent_dir)?;
                next
            }
        };
        self.clear_stale_state(project_id, child_id)?;
        self.write_stack(project_id, child_id, &stack)?;
        if let Err(e) = self.mount_locked(project_id, child_id, child_dir) {
            // The parent is whole again; the fork leaves nothing behind.
            let _ = fs::remove_dir_all(self.state(project_id, child_id));
            let _ = fs::remove_dir(child_dir);
            return Err(e);
        }
        Ok(Ok(()))
    }

    /// Without a stack, anything in a branch's state directory is left from an interrupted
    /// removal: it must never be taken for the branch's upper directory.
    fn clear_stale_state(&self, project_id: &str, branch_id: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.state(project_id, branch_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Mount a layered branch's directory if it is not mounted, finishing whatever step of a
    /// freeze a crash interrupted. A branch that is not layered is left alone.
    pub fn mount_branch(&self, project_id: &str, branch_id: &str, dir: &Path) -> io::Result<()> {
        if !self.is_layered(project_id, branch_id) {
            return Ok(());
        }
        if is_mount_point(dir)? {
            return Ok(());
        }
        let _lock = self.lock()?;
        self.mount_locked(project_id, branch_id, dir)
    }

    fn mount_locked(&self, project_id: &str, branch_id: &str, dir: &Path) -> io::Result<()> {
        let Some(stack) = self.read_stack(project_id, branch_id)? else {
            return Ok(());
        };
        if is_mount_point(dir)? {
            return Ok(());
        }
        let state = self.state(project_id, branch_id);
        let (upper, work) = (state.join("upper"), state.join("work"));
        let top = stack
            .first()
            .ok_or_else(|| invalid(format!("{} is empty", state.join("stack").display())))?;
        let top_dir = self.layer(top);
        if !top_dir.exists() {
            // A freeze was decided (the stack names the layer) but not done: the tree to freeze
            // is the upper directory, or for a branch that was plain until now, its directory.
            fs::create_dir_all(top_dir.parent().unwrap_or(&self.root))?;
            let source = if upper.exists() { &upper } else { dir };
            fs::rename(source, &top_dir)?;
            fs::File::open(top_dir.parent().unwrap_or(&self.root))?.sync_all()?;
            tracing::info!(project = project_id, branch = branch_id, layer = %top, "froze a branch tree into a layer");
        }
        let lowers: Vec<PathBuf> = stack.iter().map(|id| self.layer(id)).collect();
        if let Some(missing) = lowers.iter().find(|l| !l.exists()) {
            return Err(invalid(format!(
                "layer {} of branch {project_id}/{branch_id} is missing",
                missing.display()
            )));
        }
        fs::create_dir_all(&upper)?;
        // The scratch directory must be empty and belong to this mount alone.
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work)?;
        fs::create_dir_all(dir)?;
        if !is_empty_dir(dir)? {
            // Files written into the bare mount point while it was not mounted would be hidden
            // by the mount. Keep them where they are and say so, rather than hide anyone's work.
            return Err(invalid(format!(
                "{} holds files although branch {project_id}/{branch_id} lives in layers; move \
                 them away (they were written while it was not mounted) and retry",
                dir.display()
            )));
        }
        mount_overlay(dir, &lowers, &upper, &work)
    }

    /// Unmount a layered branch and delete its own changes and any layer no branch uses any
    /// more (eviction, after the branch was pushed and verified). Answers false for a branch
    /// that is not layered: its directory is the caller's to delete.
    pub fn remove_branch(&self, project_id: &str, branch_id: &str, dir: &Path) -> io::Result<bool> {
        if !self.is_layered(project_id, branch_id) {
            return Ok(false);
        }
        let _lock = self.lock()?;
        if is_mount_point(dir)? {
            // Detached even if a process still looks at it; the branch was verified pushed.
            unmount(dir, true)?;
        }
        let state = self.state(project_id, branch_id);
        // The branch's own changes go first and the stack last: a crash in between leaves a
        // stack over its layers (harmless: an evicted branch's restore clears it), never a
        // stray upper directory without a stack that a later freeze could take for the branch.
        for sub in ["upper", "work"] {
            match fs::remove_dir_all(state.join(sub)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        fs::remove_file(state.join("stack"))?;
        fs::remove_dir_all(&state)?;
        if dir.exists() && is_empty_dir(dir)? {
            fs::remove_dir(dir)?;
        }
        self.collect_garbage()?;
        Ok(true)
    }

    /// Delete the layers no stack names (the caller holds the lock).
    fn collect_garbage(&self) -> io::Result<()> {
        let mut used = std::collections::HashSet::new();
        let branches = self.root.join("branches");
        for project in read_dirs(&branches)? {
            for branch in read_dirs(&project)? {
                if let Ok(text) = fs::read_to_string(branch.join("stack")) {
                    used.extend(text.lines().map(|l| l.trim().to_string()));
                }
            }
        }
        for layer in read_dirs(&self.root.join("layers"))? {
            let id = layer
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !used.contains(&id) {
                fs::remove_dir_all(&layer)?;
            }
        }
        Ok(())
    }

    /// Every layered branch as (project, branch).
    pub fn branches(&self) -> io::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for project in read_dirs(&self.root.join("branches"))? {
            for branch in read_dirs(&project)? {
                if branch.join("stack").exists() {
                    let name = |p: &Path| {
                        p.file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default()
                    };
                    out.push((name(&project), name(&branch)));
                }
            }
        }
        Ok(out)
    }
}

/// A branch's directory, with its overlay mounted if the branch is layered: one stat for a plain
/// branch; the mount, when one is needed, runs off the async runtime.
pub async fn mounted_dir(
    config: &Config,
    project_id: &str,
    branch_id: &str,
) -> io::Result<PathBuf> {
    let dir = super::layout::branch_dir(
        config,
        &super::layout::BranchKey::new(project_id, branch_id),
    );
    let layers = Layers::new(config);
    if !layers.is_layered(project_id, branch_id) {
        return Ok(dir);
    }
    let (p, b, d) = (project_id.to_string(), branch_id.to_string(), dir.clone());
    tokio::task::spawn_blocking(move || layers.mount_branch(&p, &b, &d))
        .await
        .map_err(io::Error::other)??;
    Ok(dir)
}

/// Delete a branch's directory: unmount a layered branch and drop its own layer of changes, or
/// delete a plain directory. Blocks.
pub fn remove_branch_dir(
    config: &Config,
    key: &super::layout::BranchKey,
    dir: &Path,
) -> io::Result<()> {
    if Layers::new(config).remove_branch(&key.project_id, &key.branch_id, dir)? {
        return Ok(());
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Mount every layered branch of the workspace that is not mounted (after a reboot). Failures
/// are logged; the branches concerned stay unmounted and their files untouched.
pub fn mount_all(config: &Config) {
    let layers = Layers::new(config);
    let branches = match layers.branches() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot list layered branches");
            return;
        }
    };
    for (project_id, branch_id) in branches {
        let dir = super::layout::branch_dir(
            config,
            &super::layout::BranchKey::new(project_id.clone(), branch_id.clone()),
        );
        if let Err(e) = layers.mount_branch(&project_id, &branch_id, &dir) {
            tracing::error!(project = %project_id, branch = %branch_id, error = %e, "cannot mount a layered branch");
        }
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn new_layer_id() -> String {
    let mut rand = [0u8; 8];
    let _ = getrandom::fill(&mut rand);
    hex::encode(rand)
}

fn read_dirs(dir: &Path) -> io::Result<Vec<PathBuf>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn is_empty_dir(dir: &Path) -> io::Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// Whether `dir` is a mount point: a different device than its parent's, or listed as one.
pub fn is_mount_point(dir: &Path) -> io::Result<bool> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if let Some(parent) = dir.parent()
        && fs::metadata(parent)?.dev() != meta.dev()
    {
        return Ok(true);
    }
    // Same device (a bind mount, say): ask the kernel's list.
    let target = fs::canonicalize(dir)?;
    let info = fs::read("/proc/self/mountinfo")?;
    Ok(info.split(|&b| b == b'\n').any(|line| {
        line.split(|&b| b == b' ')
            .nth(4)
            .is_some_and(|p| unescape_mount_path(p) == target.as_os_str().as_bytes())
    }))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(p: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        if p[i] == b'\\'
            && i + 3 < p.len()
            && p[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((p[i + 1] - b'0') * 64 + (p[i + 2] - b'0') * 8 + (p[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(p[i]);
            i += 1;
        }
    }
    out
}

/// Whether any process has `dir` (or something in it) as working directory or root, or a file
/// in it open: what `fuser -m` would find, read from /proc (the server's own open files aside).
fn in_use(dir: &Path) -> io::Result<bool> {
    let dir = fs::canonicalize(dir)?;
    let inside = |link: &Path| fs::read_link(link).is_ok_and(|t| t.starts_with(&dir));
    let own = std::process::id().to_string();
    for proc in fs::read_dir("/proc")?.flatten() {
        let name = proc.file_name();
        if !name.as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        let path = proc.path();
        if inside(&path.join("cwd")) || inside(&path.join("root")) {
            return Ok(true);
        }
        // The server's own brief reads (the syncer walking the tree after a version, git
        // reading refs) are not users of the directory: they see the same files once it is a
        // layer, and a push cut short by the move is tried again.
        if name == own.as_str() {
            continue;
        }
        if let Ok(fds) = fs::read_dir(path.join("fd"))
            && fds.flatten().any(|fd| inside(&fd.path()))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn cstring(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| invalid(format!("{p:?}")))
}

/// Mount an overlay at `dir`. Directory renames are allowed (`redirect_dir=on`) and an owner or
/// mode change copies up no data (`metacopy=on`) where the kernel has them; otherwise renames
/// fail with EXDEV and tools copy, as they do across file systems.
fn mount_overlay(dir: &Path, lowers: &[PathBuf], upper: &Path, work: &Path) -> io::Result<()> {
    for p in lowers.iter().map(PathBuf::as_path).chain([upper, work]) {
        let bytes = p.as_os_str().as_bytes();
        if bytes.iter().any(|b| matches!(b, b',' | b':' | b'\\')) {
            return Err(invalid(format!(
                "{} cannot be named in overlay options",
                p.display()
            )));
        }
    }
    let lowerdir = lowers
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":");
    let base = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let target = cstring(dir)?;
    let mut last = io::Error::other("no mount attempted");
    // metacopy: a change of owner or mode copies only the inode up, not the data (the sandbox
    // takes ownership of a branch's files on its first command); it needs redirect_dir.
    for options in [
        format!("{base},redirect_dir=on,metacopy=on"),
        format!("{base},redirect_dir=on"),
        base,
    ] {
        let data = std::ffi::CString::new(options).map_err(|_| invalid("options".into()))?;
        match rustix::mount::mount(
            c"overlay",
            target.as_c_str(),
            c"overlay",
            rustix::mount::MountFlags::empty(),
            data.as_c_str(),
        ) {
            Ok(()) => return Ok(()),
            Err(e) => last = e.into(),
        }
    }
    Err(last)
}

/// Unmount `dir`; `detach` lets it go even while in use (MNT_DETACH).
fn unmount(dir: &Path, detach: bool) -> io::Result<()> {
    let target = cstring(dir)?;
    let flags = if detach {
        rustix::mount::UnmountFlags::DETACH
    } else {
        rustix::mount::UnmountFlags::empty()
    };
    Ok(rustix::mount::unmount(target.as_c_str(), flags)?)
}

/// Detaches every mount below its directory when dropped (tests and benchmarks: the mounts
/// would outlive their temporary workspace).
pub struct DetachOnDrop(pub PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        unmount_below(&self.0);
    }
}

/// Detach every mount at or below `root` (test and benchmark clean-up).
pub fn unmount_below(root: &Path) {
    let Ok(root) = fs::canonicalize(root) else {
        return;
    };
    let Ok(info) = fs::read("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(&unescape_mount_path(p))))
        .filter(|p| p.starts_with(&root) && p != &root)
        .collect();
    // Deepest first.
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = unmount(&p, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(br"/a\040b\134c"), b"/a b\\c".to_vec());
        assert_eq!(unescape_mount_path(br"/plain"), b"/plain".to_vec());
        assert_eq!(unescape_mount_path(br"/end\04"), br"/end\04".to_vec());
    }
}
