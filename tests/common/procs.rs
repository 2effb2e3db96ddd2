//! Processes on the machine, read from /proc: what a test checks survived (or not) a command.
#![allow(dead_code)]

/// Processes anywhere on the machine (this one aside) whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<String> {
    let own = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(marker)
            && entry.file_name() != own.as_str()
        {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}
