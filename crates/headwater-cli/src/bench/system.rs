//! The machine and the process's memory, read from `/proc` (Linux). Anything unreadable is
//! reported as unknown rather than failing the run.

use std::path::Path;

use serde::Serialize;

/// The machine a run measured.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) memory_total_kib: Option<u64>,
    pub(crate) kernel: String,
    /// The filesystem of the working directory: `type (device, mounted on …)`.
    pub(crate) filesystem: String,
    pub(crate) dir: String,
}

impl Machine {
    pub(crate) fn describe(dir: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown cpu".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|release| format!("Linux {}", release.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_total_kib: field_kib(&meminfo, "MemTotal"),
            kernel,
            filesystem: filesystem(dir),
            dir: dir.display().to_string(),
        }
    }
}

/// The mount that holds `dir`: the longest mount point that is a prefix of its canonical path.
fn filesystem(dir: &Path) -> String {
    let Ok(dir) = dir.canonicalize() else {
        return "unknown".to_owned();
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(String, String, String)> = None;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(device), Some(mount_point), Some(fs_type)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let mount_point = unescape_mount(mount_point);
        if !dir.starts_with(&mount_point) {
            continue;
        }
        let longer = best
            .as_ref()
            .is_none_or(|(_, point, _)| mount_point.len() >= point.len());
        if longer {
            best = Some((device.to_owned(), mount_point, fs_type.to_owned()));
        }
    }
    match best {
        Some((device, point, fs_type)) => format!("{fs_type} ({device}, mounted on {point})"),
        None => "unknown".to_owned(),
    }
}

/// `/proc/self/mounts` writes space, tab, newline and backslash as octal escapes.
fn unescape_mount(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The process's memory at one moment, from `/proc/self/status`, in KiB.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Memory {
    /// Resident set size.
    pub(crate) rss_kib: Option<u64>,
    /// The anonymous part of it (heap, stacks): what the process itself holds.
    pub(crate) rss_anon_kib: Option<u64>,
    /// The file-backed part of it (mapped files: the binary, memory-mapped store files).
    pub(crate) rss_file_kib: Option<u64>,
    /// The peak resident set size so far (VmHWM).
    pub(crate) peak_kib: Option<u64>,
}

impl Memory {
    pub(crate) fn sample() -> Memory {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Memory {
            rss_kib: field_kib(&status, "VmRSS"),
            rss_anon_kib: field_kib(&status, "RssAnon"),
            rss_file_kib: field_kib(&status, "RssFile"),
            peak_kib: field_kib(&status, "VmHWM"),
        }
    }
}

/// The space the files under `path` take on disk (allocated blocks), in bytes; 0 when there is
/// nothing there.
pub(crate) fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.blocks() * 512;
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| disk_bytes(&entry.path()))
        .sum()
}

/// The bytes this process has handed to `write`-family system calls so far (`wchar` of
/// `/proc/self/io`): what a store writes, its WAL and checkpoints included. `None` off Linux.
pub(crate) fn written_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == "wchar").then(|| value.trim().parse().ok())?
    })
}

/// A `Name:   1234 kB` line of `/proc/self/status` or `/proc/meminfo`.
fn field_kib(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key != name {
            return None;
        }
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields() {
        let status = "Name:\theadwater\nVmHWM:\t   12345 kB\nVmRSS:\t  2048 kB\nThreads: 3\n";
        assert_eq!(field_kib(status, "VmHWM"), Some(12_345));
        assert_eq!(field_kib(status, "VmRSS"), Some(2_048));
        assert_eq!(field_kib(status, "Threads"), None);
        assert_eq!(field_kib(status, "RssAnon"), None);
    }

    #[test]
    fn sums_the_files_of_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(disk_bytes(dir.path()), 0);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 10_000]).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![1u8; 10_000]).unwrap();
        let bytes = disk_bytes(dir.path());
        assert!((20_000..=40_960).contains(&bytes), "{bytes}");
        assert_eq!(disk_bytes(&dir.path().join("missing")), 0);
    }

    #[test]
    fn counts_written_bytes() {
        if !Path::new("/proc/self/io").exists() {
            return;
        }
        let before = written_bytes().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 100_000]).unwrap();
        let after = written_bytes().unwrap();
        assert!(after - before >= 100_000, "{before} → {after}");
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mount("/mnt/my\\040disk"), "/mnt/my disk");
    }

    #[test]
    fn finds_the_filesystem_of_a_directory() {
        let found = filesystem(Path::new("/"));
        if Path::new("/proc/self/mounts").exists() {
            assert!(found.contains("mounted on /"), "{found}");
        }
    }
}
