//! Each guest's QEMU in its own cgroup v2, `guest-<side>`, and the
//! clipboard gateway in `gateway`, under the supervisor's delegated cgroup
//! (`Delegate=yes`), with the configured limits written to `cpu.max`,
//! `memory.max` and (guests) `io.max` where the controllers are available
//! (P14). Which limits were applied and which
//! could not be is reported, never silently dropped.
//!
//! cgroup v2 lets a cgroup hand controllers to its children only while it
//! has no processes of its own, so the supervisor lives in a `supervisor`
//! child of its unit's cgroup (systemd's `DelegateSubgroup=supervisor`, or
//! moved there at start-up) and the guests in siblings of it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::config::{CgroupRoot, IoLimits, Limits, Side};

/// Where cgroup v2 is mounted on the appliance.
pub const CGROUP2_MOUNT: &str = "/sys/fs/cgroup";

/// `cpu.max` for a quota in percent of one CPU, with the default 100 ms period.
pub fn cpu_max(percent: u32) -> String {
    format!("{} 100000", u64::from(percent) * 1000)
}

/// `memory.max` in bytes.
pub fn memory_max(mib: u64) -> String {
    (mib * 1024 * 1024).to_string()
}

/// The `io.max` line for block device `major:minor`; `None` if unlimited.
pub fn io_max(device: (u32, u32), io: &IoLimits) -> Option<String> {
    if io.is_unlimited() {
        return None;
    }
    let mut line = format!("{}:{}", device.0, device.1);
    for (key, value) in [
        ("rbps", io.read_bps),
        ("wbps", io.write_bps),
        ("riops", io.read_iops),
        ("wiops", io.write_iops),
    ] {
        if let Some(v) = value {
            line.push_str(&format!(" {key}={v}"));
        }
    }
    Some(line)
}

/// The cgroup path in a `/proc/self/cgroup` text (`0::/path`, cgroup v2).
pub fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// One limit and whether it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// `cpu.max`, `memory.max`, `io.max`.
    pub file: &'static str,
    pub value: String,
    /// `Err(why)` if it could not be applied.
    pub outcome: Result<(), String>,
}

/// The guest's cgroup and what happened to its limits.
#[derive(Debug, Clone)]
pub struct GuestCgroup {
    pub dir: PathBuf,
    pub limits: Vec<Applied>,
}

impl GuestCgroup {
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// One log line: applied limits, then those that were not.
    pub fn summary(&self) -> String {
        let applied: Vec<String> = self
            .limits
            .iter()
            .filter(|a| a.outcome.is_ok())
            .map(|a| format!("{}={:?}", a.file, a.value))
            .collect();
        let missed: Vec<String> = self
            .limits
            .iter()
            .filter_map(|a| {
                a.outcome
                    .as_ref()
                    .err()
                    .map(|why| format!("{}={:?} ({why})", a.file, a.value))
            })
            .collect();
        format!(
            "cgroup {}: limits applied: {}; not applied: {}",
            self.dir.display(),
            if applied.is_empty() {
                "none".into()
            } else {
                applied.join(", ")
            },
            if missed.is_empty() {
                "none".into()
            } else {
                missed.join(", ")
            }
        )
    }

    pub fn all_applied(&self) -> bool {
        self.limits.iter().all(|a| a.outcome.is_ok())
    }
}

/// The directory under which the guests' cgroups go, with the controllers
/// we want enabled for its children where possible. Moves the supervisor
/// into `<own>/supervisor` when it still sits in its unit's cgroup itself.
pub fn prepare_root(setting: &CgroupRoot) -> Result<PathBuf> {
    let root = match setting {
        CgroupRoot::Path(dir) => {
            fs::create_dir_all(dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            dir.clone()
        }
        CgroupRoot::Auto => {
            let text =
                fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
            let rel = parse_proc_cgroup(&text).context(
                "no cgroup v2 entry in /proc/self/cgroup (is the unified hierarchy mounted?)",
            )?;
            let own = Path::new(CGROUP2_MOUNT).join(rel.trim_start_matches('/'));
            if !own.join("cgroup.controllers").exists() {
                bail!("{} is not a cgroup v2 directory (cgroup v2 must be mounted at {CGROUP2_MOUNT})", own.display());
            }
            let (root, move_into) = guest_root(&own);
            if let Some(sub) = move_into {
                fs::create_dir_all(&sub)
                    .with_context(|| format!("creating cgroup {}", sub.display()))?;
                fs::write(sub.join("cgroup.procs"), std::process::id().to_string())
                    .with_context(|| format!("moving the supervisor into {}", sub.display()))?;
            }
            root
        }
    };
    let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    for controller in ["cpu", "memory", "io"] {
        if available.split_whitespace().any(|c| c == controller) {
            // Failure shows up per limit when the guest's files are missing.
            let _ = fs::write(
                root.join("cgroup.subtree_control"),
                format!("+{controller}"),
            );
        }
    }
    Ok(root)
}

/// Where the guests' cgroups go, given the supervisor's own cgroup `own`,
/// and the cgroup the supervisor must first move into, if any: with
/// `DelegateSubgroup=supervisor` it already sits in `<unit>/supervisor`;
/// otherwise it leaves `<unit>` for `<unit>/supervisor` (a cgroup that hands
/// out controllers may hold no processes).
pub fn guest_root(own: &Path) -> (PathBuf, Option<PathBuf>) {
    match (own.file_name(), own.parent()) {
        (Some(name), Some(parent)) if name == "supervisor" => (parent.to_path_buf(), None),
        _ => (own.to_path_buf(), Some(own.join("supervisor"))),
    }
}

/// Creates (or reuses) `<root>/guest-<side>`, kills anything left in it by an
/// earlier supervisor, and writes the limits.
pub fn prepare_guest(root: &Path, side: Side, limits: &Limits, disk: &Path) -> Result<GuestCgroup> {
    prepare(
        root,
        &format!("guest-{side}"),
        side.name(),
        limits.cpu_percent,
        limits.memory_max_mib,
        Some((&limits.io, disk)),
    )
}

/// Creates (or reuses) the clipboard gateway's cgroup `<root>/gateway` (the
/// gateway and each sanitiser it starts), kills anything left in it, and
/// writes its CPU and memory limits.
pub fn prepare_gateway(root: &Path, cpu_percent: u32, memory_max_mib: u64) -> Result<GuestCgroup> {
    prepare(
        root,
        crate::gateway::CGROUP,
        "gateway",
        cpu_percent,
        memory_max_mib,
        None,
    )
}

/// `<root>/<name>` with `cpu.max`, `memory.max` and, given a disk, `io.max`
/// for that disk's device; `who` names it in log lines.
fn prepare(
    root: &Path,
    name: &str,
    who: &str,
    cpu_percent: u32,
    memory_max_mib: u64,
    io: Option<(&IoLimits, &Path)>,
) -> Result<GuestCgroup> {
    let dir = root.join(name);
    fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    let leftover = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    if !leftover.trim().is_empty() {
        crate::log::warn(format!(
            "{who}: killing processes left in {} by an earlier run: {}",
            dir.display(),
            leftover.split_whitespace().collect::<Vec<_>>().join(" ")
        ));
        kill_all(&dir);
    }
    let controllers = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    let mut applied = Vec::new();
    let mut apply = |file: &'static str, controller: &str, value: String| {
        let outcome = if !has(controller) {
            Err(format!("controller {controller} not available"))
        } else {
            fs::write(dir.join(file), &value).map_err(|e| format!("writing {file}: {e}"))
        };
        applied.push(Applied {
            file,
            value,
            outcome,
        });
    };
    apply("cpu.max", "cpu", cpu_max(cpu_percent));
    apply("memory.max", "memory", memory_max(memory_max_mib));
    if let Some((io, disk)) = io.filter(|(io, _)| !io.is_unlimited()) {
        match block_device_of(disk) {
            Ok(device) => apply("io.max", "io", io_max(device, io).expect("limited")),
            Err(why) => applied.push(Applied {
                file: "io.max",
                value: io_max((0, 0), io).expect("limited"),
                outcome: Err(format!("{why:#}")),
            }),
        }
    }
    Ok(GuestCgroup {
        dir,
        limits: applied,
    })
}

/// Kills every process in cgroup `dir` (`cgroup.kill`, Linux 5.14+).
pub fn kill_all(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_err() {
        // Older kernels: one by one.
        for pid in fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
        {
            if let Ok(pid) = pid.parse::<i32>() {
                crate::launch::kill(pid);
            }
        }
    }
}

/// The whole-disk block device (`major:minor`) holding `path`, as `io.max`
/// wants it (it refuses partitions).
pub fn block_device_of(path: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let dev = fs::metadata(existing)
        .with_context(|| format!("stat {}", existing.display()))?
        .dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    if major == 0 {
        bail!(
            "{} is on a filesystem without a block device",
            existing.display()
        );
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists() {
        let parent = fs::read_to_string(sys.join("..").join("dev"))
            .with_context(|| format!("finding the disk of partition {major}:{minor}"))?;
        return parse_dev(parent.trim()).with_context(|| format!("parsing {parent:?}"));
    }
    Ok((major, minor))
}

fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (a, b) = text.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_values_are_what_the_kernel_expects() {
        assert_eq!(cpu_max(150), "150000 100000");
        assert_eq!(cpu_max(1), "1000 100000");
        assert_eq!(memory_max(4608), "4831838208");
        let io = IoLimits {
            read_bps: Some(100),
            write_bps: None,
            read_iops: Some(7),
            write_iops: Some(9),
        };
        assert_eq!(io_max((8, 0), &io).unwrap(), "8:0 rbps=100 riops=7 wiops=9");
        assert_eq!(io_max((8, 0), &IoLimits::default()), None);
    }

    #[test]
    fn guests_go_next_to_the_supervisor() {
        let unit = Path::new("/sys/fs/cgroup/system.slice/airlockd.service");
        assert_eq!(
            guest_root(&unit.join("supervisor")),
            (unit.to_path_buf(), None)
        );
        assert_eq!(
            guest_root(unit),
            (unit.to_path_buf(), Some(unit.join("supervisor")))
        );
    }

    #[test]
    fn finds_the_v2_line() {
        assert_eq!(
            parse_proc_cgroup("1:cpu:/\n0::/system.slice/airlockd.service/supervisor\n"),
            Some("/system.slice/airlockd.service/supervisor")
        );
        assert_eq!(parse_proc_cgroup("1:cpu:/\n"), None);
        assert_eq!(parse_dev("259:0"), Some((259, 0)));
    }

    #[test]
    fn missing_controllers_are_reported_not_hidden() {
        let dir = tempfile::tempdir().unwrap();
        // A plain directory stands in for a cgroup without controllers.
        let limits = Limits {
            cpu_percent: 50,
            memory_max_mib: 100,
            io: IoLimits {
                read_bps: Some(1),
                ..Default::default()
            },
        };
        let cg = prepare_guest(dir.path(), Side::General, &limits, dir.path()).unwrap();
        assert!(!cg.all_applied());
        let s = cg.summary();
        assert!(
            s.contains("not applied: cpu.max=\"50000 100000\" (controller cpu not available)"),
            "{s}"
        );
        assert!(s.contains("memory.max=\"104857600\""), "{s}");
        assert!(s.contains("io.max"), "{s}");
        assert!(s.contains("applied: none"), "{s}");
        let cg = prepare_gateway(dir.path(), 100, 2048).unwrap();
        assert_eq!(cg.dir, dir.path().join("gateway"));
        assert_eq!(
            cg.limits
                .iter()
                .map(|a| (a.file, a.value.as_str()))
                .collect::<Vec<_>>(),
            [("cpu.max", "100000 100000"), ("memory.max", "2147483648")]
        );
    }
}
