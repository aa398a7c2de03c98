//! Integration tests (root): `airlock flash`, run as the real binary, onto
//! image files and a loop device, against a small synthetic airlock image
//! made here with the builder's own layout code (`disk::assemble`): an ESP,
//! an erofs root A holding what flash reads from an image (`/etc/passwd`,
//! the shipped `/etc/airlock/appliance.toml` from `overlay/`, a labelled
//! `/var`), an empty verity A, slot B labelled `_empty`, an ext4 data
//! partition. No `airlock build`, no VM.
//!
//! Each test checks what an administrator would: the bytes read back, the
//! table with `sfdisk --verify`, the backup GPT at the disk's end, the data
//! partition a LUKS2 container that the printed recovery key opens and whose
//! filesystem `e2fsck` finds clean, provisioned files with their owners, modes and
//! `security.selinux` xattrs; and for a refusal, one line naming the problem
//! and a target whose bytes did not change.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use airlock::disk::{self, labels, types, Content, Layout, Partition};
use airlock::exec::Runner;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// uid/gid of the sides' users in the fixture's /etc/passwd.
const CLASSIFIED_ID: u32 = 990;
const GENERAL_ID: u32 = 989;
const VAR_LABEL: &str = "system_u:object_r:var_t:s0";
const SHIPPED: &str = include_str!("../../overlay/etc/airlock/appliance.toml");
/// `/airlock/build.json` on the fixture's ESP (as `build::BuildInfo`).
const FIXTURE_BUILD_INFO: &str = r#"{"name":"airlock","version":"1.0","distro":"debian","distro_release":"trixie","profile":"production","root_hash":"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff","kernel_cmdline":"ro","package_count":1}"#;

fn require_root() {
    assert!(
        airlock::doctor::is_root(),
        "flash tests need root (loop devices, mounts); CI runs them as root"
    );
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

fn sha256_range(path: &Path, offset: u64, len: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f.take(len), &mut h).unwrap();
    hex::encode(h.finalize())
}

/// A loop device, detached when dropped.
struct LoopDev(String);

impl LoopDev {
    fn attach(args: &[&str]) -> LoopDev {
        let mut a = vec!["--find", "--show"];
        a.extend_from_slice(args);
        LoopDev(run("losetup", &a).trim().to_owned())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg(format!("{}p2", self.0))
            .output();
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A mount, unmounted when dropped.
struct MountAt(PathBuf);

impl Drop for MountAt {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Partition `p` of `disk` mounted read-only at `at` (created), through a
/// loop device over its bytes; both undone when dropped (mount first).
fn mount_partition(
    disk: &Path,
    p: &airlock::flash::TablePartition,
    at: &Path,
    fstype: &str,
) -> (MountAt, LoopDev) {
    let lo = LoopDev::attach(&[
        "--read-only",
        "--offset",
        &p.start.to_string(),
        "--sizelimit",
        &p.size.to_string(),
        disk.to_str().unwrap(),
    ]);
    std::fs::create_dir(at).unwrap();
    run(
        "mount",
        &["-t", fstype, "-o", "ro", &lo.0, at.to_str().unwrap()],
    );
    (MountAt(at.to_path_buf()), lo)
}

struct Fixture {
    dir: tempfile::TempDir,
    image: PathBuf,
    layout: Layout,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with_shipped(SHIPPED)
    }

    /// An image whose shipped configuration is `shipped`.
    fn with_shipped(shipped: &str) -> Fixture {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // The root: what flash reads from an image.
        let tree = d.join("tree");
        std::fs::create_dir_all(tree.join("etc/airlock")).unwrap();
        std::fs::create_dir_all(tree.join("var")).unwrap();
        std::fs::write(
            tree.join("etc/passwd"),
            format!(
                "root:x:0:0:root:/root:/bin/sh\nairlock-classified:x:{CLASSIFIED_ID}:{CLASSIFIED_ID}::/var/lib/airlock/classified:/usr/sbin/nologin\nairlock-general:x:{GENERAL_ID}:{GENERAL_ID}::/var/lib/airlock/general:/usr/sbin/nologin\n"
            ),
        )
        .unwrap();
        std::fs::write(tree.join("etc/airlock/appliance.toml"), shipped).unwrap();
        xattr::set(tree.join("var"), "security.selinux", VAR_LABEL.as_bytes()).unwrap();
        let root_img = d.join("root.erofs");
        run(
            "mkfs.erofs",
            &[
                "--quiet",
                root_img.to_str().unwrap(),
                tree.to_str().unwrap(),
            ],
        );
        // The data partition: /var as a fresh image has it.
        let var = d.join("var");
        std::fs::create_dir_all(var.join("lib/dpkg")).unwrap();
        std::fs::create_dir_all(var.join("log")).unwrap();
        let data_img = d.join("data.ext4");
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                "data",
                "-d",
                var.to_str().unwrap(),
                data_img.to_str().unwrap(),
                "40M",
            ],
        );

        let part =
            |number: u32, label: &str, type_uuid: &str, offset_mib: u64, size_mib: u64| Partition {
                number,
                label: label.into(),
                type_uuid: type_uuid.into(),
                uuid: uuid::Uuid::from_u128(0x1000 + number as u128).to_string(),
                offset: offset_mib * MIB,
                size: size_mib * MIB,
            };
        let layout = Layout {
            disk_uuid: uuid::Uuid::from_u128(0x1000).to_string(),
            size: 61 * MIB,
            partitions: vec![
                part(1, labels::ESP, types::ESP, 1, 1),
                part(2, "root_airlock_1.0", types::ROOT_X86_64, 2, 8),
                part(3, "verity_airlock_1.0", types::ROOT_X86_64_VERITY, 10, 1),
                part(4, labels::EMPTY, types::ROOT_X86_64, 11, 8),
                part(5, labels::EMPTY, types::ROOT_X86_64_VERITY, 19, 1),
                part(6, labels::DATA, types::VAR, 20, 40),
            ],
        };
        // The ESP: FAT with the build information `airlock inspect` reads.
        let esp = d.join("esp");
        run(
            "mkfs.vfat",
            &["-C", "-n", "ESP", esp.to_str().unwrap(), "1024"],
        );
        let build = d.join("build.json");
        std::fs::write(&build, FIXTURE_BUILD_INFO).unwrap();
        let esp_spec = esp.to_str().unwrap();
        let mtools = |program: &str, args: &[&str]| {
            let out = Command::new(program)
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        mtools("mmd", &["-i", esp_spec, "::/airlock"]);
        mtools(
            "mcopy",
            &[
                "-i",
                esp_spec,
                build.to_str().unwrap(),
                "::/airlock/build.json",
            ],
        );
        let image = d.join("airlock_1.0.raw");
        let runner = Runner::new(false).unwrap();
        let contents = [
            Content {
                partition: &layout.partitions[0],
                image: &esp,
            },
            Content {
                partition: &layout.partitions[1],
                image: &root_img,
            },
            Content {
                partition: &layout.partitions[5],
                image: &data_img,
            },
        ];
        disk::assemble(&runner, &layout, &contents, &image).unwrap();
        Fixture { dir, image, layout }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An image file target of `size` bytes, filled with 0xaa up to 1 MiB
    /// past the image (so stale bytes would show) and sparse after.
    fn target(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let fill = (self.layout.size + MIB).min(size);
        std::fs::write(self.path("fill"), vec![0xaau8; fill as usize]).unwrap();
        run(
            "dd",
            &[
                &format!("if={}", self.path("fill").display()),
                &format!("of={}", p.display()),
                "conv=notrunc",
                "status=none",
            ],
        );
        p
    }

    fn flash(&self, target: &Path, extra: &[&str]) -> Output {
        self.flash_file(&self.image, target, extra)
    }

    /// `airlock flash FILE TARGET …` with another file than the image.
    fn flash_file(&self, file: &Path, target: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "flash".to_string(),
            file.display().to_string(),
            target.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Command::new(env!("CARGO_BIN_EXE_airlock"))
            .args(&args)
            .output()
            .unwrap()
    }
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "flash failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The refusal line (the only line on stderr) of a failed flash.
fn refused(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "flash succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{stderr}");
    stderr
}

/// `sfdisk --verify` says nothing is wrong, and the table is an airlock one.
fn check_table(disk: &Path) -> airlock::flash::Table {
    let verify = Command::new("sfdisk")
        .arg("--verify")
        .arg(disk)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success()
            && text.contains("No errors detected")
            && !text.to_lowercase().contains("warning"),
        "{text}"
    );
    let table =
        airlock::flash::parse_sfdisk_json(&run("sfdisk", &["--json", disk.to_str().unwrap()]))
            .unwrap();
    airlock::flash::image_layout(&table).unwrap();
    let empty: Vec<u32> = table
        .partitions
        .iter()
        .filter(|p| p.label == labels::EMPTY)
        .map(|p| p.number)
        .collect();
    assert_eq!(empty, [4, 5], "slot B stays _empty");
    table
}

/// The backup GPT header is in the disk's last sector, and the primary
/// header points there.
fn check_backup_gpt_at_end(disk: &Path, size: u64) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(disk).unwrap();
    let mut sector = [0u8; 512];
    f.seek(SeekFrom::Start(size - 512)).unwrap();
    f.read_exact(&mut sector).unwrap();
    assert_eq!(
        &sector[..8],
        b"EFI PART",
        "no backup GPT header in the last sector"
    );
    f.seek(SeekFrom::Start(512)).unwrap();
    f.read_exact(&mut sector).unwrap();
    assert_eq!(&sector[..8], b"EFI PART");
    let alternate = u64::from_le_bytes(sector[32..40].try_into().unwrap());
    assert_eq!(alternate, size / 512 - 1, "primary header's backup LBA");
}

/// The first five partitions hold the image's bytes.
fn check_partitions_as_image(fx: &Fixture, disk: &Path) {
    for p in &fx.layout.partitions[..5] {
        assert_eq!(
            sha256_range(disk, p.offset, p.size),
            sha256_range(&fx.image, p.offset, p.size),
            "partition {}",
            p.label
        );
    }
}

/// The recovery key `airlock flash` printed.
fn recovery_key(stdout: &str) -> String {
    let after = stdout
        .split_once("RECOVERY KEY for /var")
        .unwrap_or_else(|| panic!("no recovery key printed:\n{stdout}"))
        .1;
    let key = after
        .lines()
        .map(str::trim)
        .find(|l| l.len() == 71 && l.split('-').count() == 8)
        .unwrap_or_else(|| panic!("no recovery key line:\n{stdout}"));
    key.to_owned()
}

/// The data partition opened as IT would with the recovery key: `cryptsetup`
/// gives the volume key for it (no device-mapper on this host, so the data
/// segment is then decrypted into a file, with the XTS flash wrote it with;
/// flash's unit tests check that against the IEEE 1619 vectors). Checks the
/// header on the way: LUKS2, two keyslots, the empty passphrase in one.
fn open_data(
    disk: &Path,
    table: &airlock::flash::Table,
    stdout: &str,
) -> (tempfile::TempDir, PathBuf) {
    use airlock::flash::luks;
    let data = table
        .partitions
        .iter()
        .find(|p| p.label == labels::DATA)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("recovery");
    std::fs::write(&key_file, recovery_key(stdout)).unwrap();
    let lo = LoopDev::attach(&[
        "--read-only",
        "--offset",
        &data.start.to_string(),
        "--sizelimit",
        &data.size.to_string(),
        disk.to_str().unwrap(),
    ]);
    let json = run("cryptsetup", &["luksDump", "--dump-json-metadata", &lo.0]);
    let segment = luks::parse_metadata(&json).unwrap();
    luks::check_segment(&segment).unwrap();
    assert_eq!(segment.keyslots, 2, "{json}");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    run(
        "cryptsetup",
        &[
            "open",
            "--test-passphrase",
            "--key-file",
            empty.to_str().unwrap(),
            &lo.0,
        ],
    );
    let vk_file = dir.path().join("vk");
    run(
        "cryptsetup",
        &[
            "luksDump",
            "-q",
            "--dump-volume-key",
            "--key-file",
            key_file.to_str().unwrap(),
            "--volume-key-file",
            vk_file.to_str().unwrap(),
            &lo.0,
        ],
    );
    drop(lo);
    let key = luks::VolumeKey::from_bytes(&std::fs::read(&vk_file).unwrap()).unwrap();
    let cipher = luks::SegmentCipher::new(&key, segment.iv_tweak);
    let len = data.size - segment.offset;
    let mut bytes = luks::read_at(disk, data.start + segment.offset, len as usize).unwrap();
    cipher.decrypt(&mut bytes, 0);
    let plain = dir.path().join("var.ext4");
    std::fs::write(&plain, bytes).unwrap();
    (dir, plain)
}

/// The data partition: LUKS2, opened by the recovery key; e2fsck finds its
/// filesystem clean, and it fills the partition less the LUKS2 header.
fn check_data_fs(disk: &Path, table: &airlock::flash::Table, stdout: &str) {
    let data = table
        .partitions
        .iter()
        .find(|p| p.label == labels::DATA)
        .unwrap();
    let (_dir, plain) = open_data(disk, table, stdout);
    run("e2fsck", &["-f", "-n", plain.to_str().unwrap()]);
    let header = run("dumpe2fs", &["-h", plain.to_str().unwrap()]);
    let field = |name: &str| -> u64 {
        header
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("{name} in dumpe2fs"))
    };
    let fs_bytes = field("Block count:") * field("Block size:");
    let room = data.size - airlock::flash::luks::DATA_OFFSET;
    assert!(
        fs_bytes <= room && room - fs_bytes < 4 * MIB,
        "ext4 {fs_bytes} bytes in a {} byte partition",
        data.size
    );
}

/// The data filesystem (opened with the recovery key) mounted read-only at
/// `at` (created); undone when dropped.
fn mount_data(
    disk: &Path,
    table: &airlock::flash::Table,
    stdout: &str,
    at: &Path,
) -> (MountAt, LoopDev, tempfile::TempDir) {
    let (dir, plain) = open_data(disk, table, stdout);
    let lo = LoopDev::attach(&["--read-only", plain.to_str().unwrap()]);
    std::fs::create_dir(at).unwrap();
    run(
        "mount",
        &["-t", "ext4", "-o", "ro", &lo.0, at.to_str().unwrap()],
    );
    (MountAt(at.to_path_buf()), lo, dir)
}

#[test]
fn flash_into_an_image_file_of_the_same_size() {
    let fx = Fixture::new();
    let target = fx.target("same.raw", fx.layout.size);
    let stdout = ok(&fx.flash(&target, &[]));
    assert!(stdout.contains("matches the image"), "{stdout}");
    let data_start = fx.layout.partitions[5].offset;
    assert_eq!(
        sha256_range(&target, 0, data_start),
        sha256_range(&fx.image, 0, data_start),
        "the target is the image, byte for byte, up to the data partition"
    );
    let table = check_table(&target);
    check_backup_gpt_at_end(&target, fx.layout.size);
    check_data_fs(&target, &table, &stdout);
}

/// A disk the image's size has no room to grow, but a machine file fits.
#[test]
fn a_same_size_disk_takes_a_machine_file() {
    let fx = Fixture::new();
    let target = fx.target("same.raw", fx.layout.size);
    let machine = fx.path("m.toml");
    std::fs::write(&machine, MACHINE).unwrap();
    let stdout = ok(&fx.flash(&target, &["--machine", machine.to_str().unwrap()]));
    assert!(
        stdout.contains("provisioned /var/lib/airlock/provision/appliance.toml"),
        "{stdout}"
    );
    check_data_fs(&target, &check_table(&target), &stdout);
}

#[test]
fn flash_into_a_larger_image_file_moves_the_backup_gpt_and_grows_the_data_partition() {
    let fx = Fixture::new();
    let size = 200 * MIB;
    let target = fx.target("large.raw", size);
    let stdout = ok(&fx.flash(&target, &[]));
    assert!(
        stdout.contains("matches the image") && stdout.contains("data partition grown"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().len(),
        size,
        "the target file keeps its size"
    );
    let table = check_table(&target);
    check_backup_gpt_at_end(&target, size);
    check_partitions_as_image(&fx, &target);
    let data = table
        .partitions
        .iter()
        .find(|p| p.label == labels::DATA)
        .unwrap();
    assert_eq!(data.start, fx.layout.partitions[5].offset);
    assert!(
        data.start + data.size > size - 2 * MIB,
        "data partition ends at {} of {size}",
        data.start + data.size
    );
    // A whole number of MiB: systemd-repart at first boot rounds partitions
    // up to 4 KiB and fails when that rounding does not fit.
    assert_eq!(data.size % MIB, 0, "data partition of {} bytes", data.size);
    check_data_fs(&target, &table, &stdout);
    // The bytes between the image's end and the disk's end carry nothing stale.
    assert!(
        stdout.contains(&format!("{} MiB of a 200 MiB disk", data.size / MIB)),
        "{stdout}"
    );
}

#[test]
fn flash_onto_a_block_device() {
    let fx = Fixture::new();
    let backing = fx.target("backing.raw", 96 * MIB);
    let lo = LoopDev::attach(&[backing.to_str().unwrap()]);
    let dev = PathBuf::from(&lo.0);
    let stdout = ok(&fx.flash(&dev, &[]));
    assert!(
        stdout.contains("block device") && stdout.contains("matches the image"),
        "{stdout}"
    );
    let table = check_table(&dev);
    check_backup_gpt_at_end(&dev, 96 * MIB);
    check_partitions_as_image(&fx, &dev);
    check_data_fs(&dev, &table, &stdout);
    // IT guide §9: `airlock inspect /dev/sdX` on a PC's disk.
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args(["inspect", lo.0.as_str()])
        .output()
        .unwrap();
    let shown = ok(&out);
    assert!(
        shown.contains("name         airlock 1.0")
            && shown.contains("root_airlock_1.0")
            && shown.contains("_empty")
            && shown.contains(" data "),
        "airlock inspect {}:\n{shown}",
        lo.0
    );
}

#[test]
fn a_mounted_or_attached_target_is_refused_and_untouched() {
    let fx = Fixture::new();
    let target = fx.target("busy.raw", 64 * MIB);
    ok(&fx.flash(&target, &[]));
    let before = sha256(&target);
    let lo = LoopDev::attach(&["--partscan", target.to_str().unwrap()]);
    // Attached, nothing mounted.
    let e = refused(&fx.flash(&target, &[]));
    assert!(
        e.contains("is in use") && e.contains(&format!("attached to {}", lo.0)),
        "{e}"
    );
    // A partition mounted (the root, erofs; the data partition is LUKS2):
    // refused as a file, and as the block device.
    let mnt = fx.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut part = format!("{}p2", lo.0);
    for _ in 0..50 {
        if Path::new(&part).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if !Path::new(&part).exists() {
        part = format!("{}p2", lo.0);
        run("partx", &["--add", &lo.0]);
    }
    run("mount", &["-o", "ro", &part, mnt.to_str().unwrap()]);
    let _m = MountAt(mnt.clone());
    let e = refused(&fx.flash(&target, &[]));
    assert!(
        e.contains(&format!("{part} is mounted on {}", mnt.display())),
        "{e}"
    );
    let e = refused(&fx.flash(Path::new(&lo.0), &[]));
    assert!(
        e.contains("is in use") && e.contains(&format!("{part} is mounted on")),
        "{e}"
    );
    // A partition instead of the disk.
    let e = refused(&fx.flash(Path::new(&part), &[]));
    assert!(
        e.contains("is a partition") && e.contains(&format!("give the whole disk, {}", lo.0)),
        "{e}"
    );
    drop(_m);
    drop(lo);
    assert_eq!(
        sha256(&target),
        before,
        "a refused flash changed the target"
    );
}

#[test]
fn a_target_smaller_than_the_image_is_refused_and_untouched() {
    let fx = Fixture::new();
    let target = fx.target("small.raw", 8 * MIB);
    let before = sha256(&target);
    let e = refused(&fx.flash(&target, &[]));
    assert!(
        e.contains("is too small") && e.contains(&format!("needs {} bytes", fx.layout.size)),
        "{e}"
    );
    assert_eq!(sha256(&target), before);
    let e = refused(&fx.flash(&fx.path("missing.raw"), &[]));
    assert!(e.contains("does not exist"), "{e}");
    // The image itself (an image-file target is emptied first: it would be lost).
    let image_before = sha256(&fx.image);
    let e = refused(&fx.flash(&fx.image, &[]));
    assert!(e.contains("is the image itself"), "{e}");
    let lo = LoopDev::attach(&["--read-only", fx.image.to_str().unwrap()]);
    let e = refused(&fx.flash(Path::new(&lo.0), &[]));
    assert!(e.contains("is the image itself"), "{e}");
    drop(lo);
    assert_eq!(sha256(&fx.image), image_before);
}

/// Guest images: a raw disk (an MBR on it) and a qcow2.
fn guests(fx: &Fixture) -> (PathBuf, PathBuf) {
    let raw = fx.path("classified.img");
    let mut bytes = vec![0u8; 6 * MIB as usize];
    for (i, b) in bytes
        .iter_mut()
        .enumerate()
        .skip(MIB as usize)
        .take(MIB as usize)
    {
        *b = (i % 251) as u8;
    }
    std::fs::write(&raw, &bytes).unwrap();
    let out = Command::new("sfdisk")
        .args(["--quiet", raw.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(b"label: dos\nstart=2048, size=8192, type=7\n")?;
            c.wait()
        });
    assert!(out.unwrap().success());
    let qcow2 = fx.path("general.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            qcow2.to_str().unwrap(),
            "64M",
        ],
    );
    (raw, qcow2)
}

const MACHINE: &str = "# pc-0042\n[guest.classified]\ndisk = \"/var/lib/airlock/classified/disk/windows.img\"\ndisk_format = \"raw\"\nmemory_mib = 6144\n\n[guest.classified.limits]\nmemory_max_mib = 6656\n";

#[test]
fn provisioning_places_guests_and_machine_with_owners_modes_and_labels() {
    let fx = Fixture::new();
    let (raw, qcow2) = guests(&fx);
    let machine = fx.path("pc-0042.toml");
    std::fs::write(&machine, MACHINE).unwrap();
    let target = fx.target("pc.raw", 160 * MIB);
    let stdout = ok(&fx.flash(
        &target,
        &[
            "--guest",
            &format!("classified={}", raw.display()),
            "--guest",
            &format!("general={}", qcow2.display()),
            "--machine",
            machine.to_str().unwrap(),
        ],
    ));
    assert!(
        stdout.contains("provisioned /var/lib/airlock/classified/disk/windows.img"),
        "{stdout}"
    );
    let table = check_table(&target);
    check_data_fs(&target, &table, &stdout);

    let mnt = fx.path("data");
    let _mounted = mount_data(&target, &table, &stdout, &mnt);
    let label = |p: &Path| {
        String::from_utf8(xattr::get(p, "security.selinux").unwrap().expect("a label")).unwrap()
    };
    let check = |rel: &str, uid: u32, mode: u32, type_: &str| {
        let p = mnt.join(rel);
        let m = std::fs::metadata(&p).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!((m.uid(), m.gid()), (uid, uid), "{rel} owner");
        assert_eq!(m.permissions().mode() & 0o7777, mode, "{rel} mode");
        assert_eq!(
            label(&p),
            format!("system_u:object_r:{type_}:s0"),
            "{rel} label"
        );
    };
    check("lib/airlock", 0, 0o755, "airlock_var_lib_t");
    check("lib/airlock/provision", 0, 0o755, "airlock_conf_t");
    check(
        "lib/airlock/provision/appliance.toml",
        0,
        0o600,
        "airlock_conf_t",
    );
    check(
        "lib/airlock/classified",
        0,
        0o755,
        "airlock_classified_disk_t",
    );
    check(
        "lib/airlock/classified/disk",
        CLASSIFIED_ID,
        0o700,
        "airlock_classified_disk_t",
    );
    check(
        "lib/airlock/classified/disk/windows.img",
        CLASSIFIED_ID,
        0o600,
        "airlock_classified_disk_t",
    );
    check(
        "lib/airlock/general/disk",
        GENERAL_ID,
        0o700,
        "airlock_general_disk_t",
    );
    check(
        "lib/airlock/general/disk/windows.qcow2",
        GENERAL_ID,
        0o600,
        "airlock_general_disk_t",
    );
    assert_eq!(
        std::fs::read(mnt.join("lib/airlock/provision/appliance.toml")).unwrap(),
        MACHINE.as_bytes()
    );
    assert_eq!(
        sha256(&mnt.join("lib/airlock/classified/disk/windows.img")),
        sha256(&raw)
    );
    assert_eq!(
        sha256(&mnt.join("lib/airlock/general/disk/windows.qcow2")),
        sha256(&qcow2)
    );
    // What was there stays; nothing half-written is left.
    assert!(mnt.join("lib/dpkg").is_dir());
    let leftovers: Vec<_> = walkdir::WalkDir::new(mnt.join("lib/airlock"))
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The supervisor's configuration code reads the provisioned layer as flash did.
    let config = airlockd::config::load(
        &fx.path("tree/etc/airlock/appliance.toml"),
        Some(&mnt.join("lib/airlock/provision/appliance.toml")),
    )
    .unwrap();
    assert_eq!(config.classified.memory_mib, 6144);
    assert_eq!(
        config.classified.disk,
        PathBuf::from("/var/lib/airlock/classified/disk/windows.img")
    );
}

/// IT guide §4, step 7: a disk from elsewhere is refused as it is, and
/// accepted once converted with the guide's own `qemu-img convert`
/// command (also an image with a backing file, flattened the same way).
/// No Windows in it: the commands and the checks on their result.
#[test]
fn a_foreign_disk_converted_as_the_guide_says_is_accepted() {
    let fx = Fixture::new();
    let (raw, _) = guests(&fx);
    let machine = fx.path("pc-0042.toml");
    std::fs::write(&machine, MACHINE).unwrap();
    let path = |name: &str| fx.path(name).to_str().unwrap().to_owned();
    let flash_general = |general: &str| {
        let target = fx.target("pc.raw", 160 * MIB);
        let classified = format!("classified={}", raw.display());
        let general = format!("general={general}");
        (
            fx.flash(
                &target,
                &[
                    "--guest",
                    &classified,
                    "--guest",
                    &general,
                    "--machine",
                    machine.to_str().unwrap(),
                ],
            ),
            target,
        )
    };
    run(
        "qemu-img",
        &["create", "-q", "-f", "vhdx", &path("win.vhdx"), "64M"],
    );
    let (out, _) = flash_general(&path("win.vhdx"));
    let e = refused(&out);
    assert!(e.contains("win.vhdx") && e.contains("vhdx"), "{e}");

    run(
        "qemu-img",
        &[
            "convert",
            "-p",
            "-O",
            "qcow2",
            &path("win.vhdx"),
            &path("win-general.qcow2"),
        ],
    );
    let info = run("qemu-img", &["info", &path("win-general.qcow2")]);
    assert!(
        info.contains("file format: qcow2") && !info.contains("backing file"),
        "{info}"
    );
    let (out, _) = flash_general(&path("win-general.qcow2"));
    assert!(ok(&out).contains("provisioned /var/lib/airlock/general/disk/"));

    // An overlay on that disk: refused; flattened by the same command: accepted.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &path("win-general.qcow2"),
            "-F",
            "qcow2",
            &path("overlay.qcow2"),
        ],
    );
    let (out, _) = flash_general(&path("overlay.qcow2"));
    assert!(
        refused(&out).contains("backing file"),
        "the overlay was not refused for its backing file"
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-p",
            "-O",
            "qcow2",
            &path("overlay.qcow2"),
            &path("flat.qcow2"),
        ],
    );
    let info = run("qemu-img", &["info", &path("flat.qcow2")]);
    assert!(
        info.contains("file format: qcow2") && !info.contains("backing file"),
        "{info}"
    );
    let (out, _) = flash_general(&path("flat.qcow2"));
    ok(&out);
}

#[test]
fn bad_guest_files_are_refused_before_anything_is_written() {
    let fx = Fixture::new();
    let (raw, qcow2) = guests(&fx);
    let machine = fx.path("m.toml");
    std::fs::write(&machine, MACHINE).unwrap();
    let target = fx.target("pc.raw", 160 * MIB);
    let before = sha256(&target);
    let vmdk = fx.path("w.vmdk");
    run(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "16M"],
    );
    let text = fx.path("notes.txt");
    std::fs::write(&text, "not a disk at all\n".repeat(100)).unwrap();
    let base = fx.path("base.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "16M"],
    );
    let overlay = fx.path("overlay.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            overlay.to_str().unwrap(),
        ],
    );
    let m = machine.to_str().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            format!("general={}", vmdk.display()),
            "a vmdk image; airlock takes raw or qcow2",
        ),
        (format!("classified={}", text.display()), "not a disk image"),
        (
            format!("general={}", overlay.display()),
            "has a backing file",
        ),
        (
            format!("classified={}", qcow2.display()),
            "is a qcow2 image, but guest.classified.disk_format is \"raw\"",
        ),
        (
            format!("general={}", raw.display()),
            "is a raw image, but guest.general.disk_format is \"qcow2\"",
        ),
        (
            format!("general={}", fx.path("absent.qcow2").display()),
            "absent.qcow2",
        ),
    ];
    for (guest, want) in cases {
        let e = refused(&fx.flash(&target, &["--guest", &guest, "--machine", m]));
        let file = guest.split_once('=').unwrap().1;
        assert!(e.contains(want) && e.contains(file), "{guest}: {e}");
    }
    // Guests that do not fit the disk, even with the data partition grown.
    let big = fx.path("big.img");
    std::fs::copy(&raw, &big).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    let e = refused(&fx.flash(
        &target,
        &[
            "--guest",
            &format!("classified={}", big.display()),
            "--machine",
            m,
        ],
    ));
    assert!(e.contains("no room for the provisioned files"), "{e}");
    let e = refused(&fx.flash(
        &target,
        &["--guest", &format!("general={}", qcow2.display())],
    ));
    assert!(e.contains("--guest needs --machine"), "{e}");
    assert_eq!(
        sha256(&target),
        before,
        "a refused flash changed the target"
    );
}

#[test]
fn a_bad_machine_file_is_refused_naming_file_line_and_key() {
    let fx = Fixture::new();
    let target = fx.target("pc.raw", 160 * MIB);
    let before = sha256(&target);
    let cases = [
        (
            "[guest.general]\nvcpus = 2\nmemory_mib = 10\n",
            "line 3: `guest.general.memory_mib`: 10 MiB is outside",
        ),
        (
            "\n[guest.classified]\ndevices = [\"usb\"]\n",
            "line 3: `guest.classified.devices`: may only be set in the shipped configuration",
        ),
        (
            "[supervisor]\ntest_mode = true\n",
            "line 1: `supervisor`: may only be set in the shipped configuration",
        ),
        (
            "[guest.general]\ndisk = \"/var/lib/airlock/classified/disk/x.qcow2\"\n",
            "line 2: `guest.general.disk`",
        ),
        (
            "[guest.general]\nmemroy_mib = 4096\n",
            "unknown field `memroy_mib`",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let machine = fx.path(&format!("machine-{i}.toml"));
        std::fs::write(&machine, text).unwrap();
        let e = refused(&fx.flash(&target, &["--machine", machine.to_str().unwrap()]));
        assert!(
            e.contains(&machine.display().to_string()) && e.contains(want),
            "{text}: {e}"
        );
    }
    assert_eq!(
        sha256(&target),
        before,
        "a refused flash changed the target"
    );
}

/// The test image's shipped configuration has a `[network]` section without
/// uplinks (the production one leaves `[network]` to the site's overlay):
/// per-PC uplink addresses are machine settings; a bad one is refused
/// naming its key and line.
#[test]
fn machine_uplink_addresses_are_provisioned_and_checked() {
    let fx = Fixture::with_shipped(&shipped_without_tunnel());
    let target = fx.target("pc.raw", 96 * MIB);
    let before = sha256(&target);
    let bad = fx.path("bad-uplink.toml");
    std::fs::write(
        &bad,
        "[network.classified.uplink]\ninterface = \"enp1s0\"\naddress = \"192.168.10.300/24\"\ngateway = \"192.168.10.1\"\n\n\
         [network.general.uplink]\ninterface = \"enp2s0\"\naddress = \"192.168.20.20/24\"\ngateway = \"192.168.20.1\"\n",
    )
    .unwrap();
    let e = refused(&fx.flash(&target, &["--machine", bad.to_str().unwrap()]));
    assert!(
        e.contains(&bad.display().to_string())
            && e.contains("line 3")
            && e.contains("network.classified.uplink.address"),
        "{e}"
    );
    assert_eq!(sha256(&target), before);
    let good = fx.path("pc-0042.toml");
    // Both sides' uplinks: the test image ships none (they are per PC).
    std::fs::write(&good, UPLINKS).unwrap();
    let stdout = ok(&fx.flash(&target, &["--machine", good.to_str().unwrap()]));
    assert!(
        stdout.contains("provisioned /var/lib/airlock/provision/appliance.toml"),
        "{stdout}"
    );
}

/// The test image's shipped configuration: a `[network]` section without
/// uplinks, and a WireGuard tunnel for the classified servers, as a site
/// that uses one ships it (the peer and its key are the image's; the PC's
/// tunnel address and private key are not).
const SHIPPED_WITH_TUNNEL: &str =
    include_str!("../../ci/test-agent/overlay/etc/airlock/appliance.toml");

/// The same without the tunnel (its table is the file's last).
fn shipped_without_tunnel() -> String {
    let at = SHIPPED_WITH_TUNNEL
        .find("\n[network.classified.wireguard]")
        .expect("the test image ships a tunnel");
    assert!(
        !SHIPPED_WITH_TUNNEL[at + 2..].contains("\n["),
        "the tunnel is not the test image's last table"
    );
    SHIPPED_WITH_TUNNEL[..at + 1].to_owned()
}

const UPLINKS: &str = "[network.classified.uplink]\ninterface = \"enp1s0\"\naddress = \"192.168.10.20/24\"\ngateway = \"192.168.10.1\"\n\n\
     [network.general.uplink]\ninterface = \"enp2s0\"\naddress = \"192.168.20.20/24\"\ngateway = \"192.168.20.1\"\n";

/// IT guide §5: a PC of an image with a tunnel gets its own tunnel address
/// (machine file) and private key (`--wireguard-key`). Without the key, with
/// a file that is not a key, or with a key for an image without a tunnel,
/// flash refuses before writing; with it, the key lands `0600 root`,
/// labelled for the network set-up alone, and the public key printed is
/// the one `wg pubkey` computes.
#[test]
fn per_pc_wireguard_key_and_address_are_provisioned_and_checked() {
    let fx = Fixture::with_shipped(SHIPPED_WITH_TUNNEL);
    let target = fx.target("pc.raw", 96 * MIB);
    let before = sha256(&target);
    let machine = fx.path("pc-0042.toml");
    std::fs::write(
        &machine,
        format!("{UPLINKS}\n[network.classified.wireguard]\naddress = \"10.99.0.42/24\"\n"),
    )
    .unwrap();
    let m = machine.to_str().unwrap();

    // No key for an image with a tunnel.
    let e = refused(&fx.flash(&target, &["--machine", m]));
    assert!(
        e.contains("--wireguard-key") && e.contains("network.classified.wireguard"),
        "{e}"
    );
    // A file that is not a key (a PEM key, say).
    let pem = fx.path("pc-0042.pem");
    std::fs::write(
        &pem,
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VuBCIEIHBh\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let e = refused(&fx.flash(
        &target,
        &["--machine", m, "--wireguard-key", pem.to_str().unwrap()],
    ));
    assert!(
        e.contains(&pem.display().to_string()) && e.contains("not a WireGuard private key"),
        "{e}"
    );
    // The machine file without the PC's tunnel address.
    let no_address = fx.path("no-address.toml");
    std::fs::write(&no_address, UPLINKS).unwrap();
    let key = fx.path("pc-0042.key");
    let private = run("wg", &["genkey"]);
    std::fs::write(&key, &private).unwrap();
    let e = refused(&fx.flash(
        &target,
        &[
            "--machine",
            no_address.to_str().unwrap(),
            "--wireguard-key",
            key.to_str().unwrap(),
        ],
    ));
    assert!(
        e.contains("network.classified.wireguard.address") && e.contains("machine file"),
        "{e}"
    );
    assert_eq!(sha256(&target), before, "a refusal wrote to the target");

    let stdout = ok(&fx.flash(
        &target,
        &["--machine", m, "--wireguard-key", key.to_str().unwrap()],
    ));
    let public = {
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), private.as_bytes()).unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned()
    };
    assert!(
        stdout.contains(&format!(
            "provisioned /var/lib/airlock/provision/wg-classified.key (from {})",
            key.display()
        )) && stdout.contains(&format!(
            "public key {public} (add it to the tunnel server's peers)"
        )),
        "{stdout}"
    );
    assert!(
        !stdout.contains(private.trim()),
        "the private key was printed:\n{stdout}"
    );
    let table = check_table(&target);
    let mnt = fx.path("data");
    let _mounted = mount_data(&target, &table, &stdout, &mnt);
    let placed = mnt.join("lib/airlock/provision/wg-classified.key");
    let meta = std::fs::metadata(&placed).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777),
        (0, 0, 0o600)
    );
    assert_eq!(
        String::from_utf8(
            xattr::get(&placed, "security.selinux")
                .unwrap()
                .expect("a label")
        )
        .unwrap(),
        "system_u:object_r:airlock_wg_key_t:s0"
    );
    assert_eq!(std::fs::read_to_string(&placed).unwrap(), private);
    // The network set-up reads the tunnel as flash checked it.
    let config = airlockd::config::load(
        &fx.path("tree/etc/airlock/appliance.toml"),
        Some(&mnt.join("lib/airlock/provision/appliance.toml")),
    )
    .unwrap();
    let wg = config.network.unwrap().classified.wireguard.unwrap();
    assert_eq!(
        (
            wg.address.to_string().as_str(),
            wg.private_key_file.as_str()
        ),
        (
            "10.99.0.42/24",
            "/var/lib/airlock/provision/wg-classified.key"
        )
    );

    // An image without a tunnel takes no key.
    let plain = Fixture::with_shipped(&shipped_without_tunnel());
    let target = plain.target("pc.raw", 96 * MIB);
    let uplinks = plain.path("uplinks.toml");
    std::fs::write(&uplinks, UPLINKS).unwrap();
    let e = refused(&plain.flash(
        &target,
        &[
            "--machine",
            uplinks.to_str().unwrap(),
            "--wireguard-key",
            key.to_str().unwrap(),
        ],
    ));
    assert!(e.contains("no WireGuard tunnel"), "{e}");
}

/// A real built image (`airlock build` output, with its `SHA256SUMS` and
/// `<stem>.selinux/file_contexts` beside it), flashed onto a larger file
/// with a provisioned qcow2 and machine file: the read-back sha256 is the
/// one in `SHA256SUMS`, the provisioned files carry exactly the labels of
/// the image's own compiled `file_contexts`, and their owners are the
/// image's users. Opt-in (reads and writes a few GiB):
/// `AIRLOCK_TEST_IMAGE=out/airlock_1.0.raw cargo test -p airlock --test flash -- --ignored`.
#[test]
#[ignore = "needs a built image: AIRLOCK_TEST_IMAGE=out/airlock_1.0.raw"]
fn a_built_image_flashes_and_provisions_with_its_own_labels() {
    require_root();
    let image = PathBuf::from(
        std::env::var_os("AIRLOCK_TEST_IMAGE")
            .expect("set AIRLOCK_TEST_IMAGE to a built .raw image"),
    );
    let out = image.parent().unwrap();
    let stem = image.file_stem().unwrap().to_string_lossy().into_owned();
    let sums = std::fs::read_to_string(out.join("SHA256SUMS")).unwrap();
    let name = image.file_name().unwrap().to_string_lossy().into_owned();
    let want_sha = sums
        .lines()
        .find_map(|l| l.strip_suffix(&format!("  {name}")))
        .expect("the image in SHA256SUMS")
        .to_owned();
    let contexts =
        std::fs::read_to_string(out.join(format!("{stem}.selinux/file_contexts"))).unwrap();
    let context_of = |pattern: &str| -> String {
        contexts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&pattern)).then(|| f.last().unwrap().to_string())
            })
            .unwrap_or_else(|| panic!("{pattern} not in the image's file_contexts"))
    };

    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("pc.raw");
    let size = std::fs::metadata(&image).unwrap().len() + 2048 * MIB;
    std::fs::File::create(&target)
        .unwrap()
        .set_len(size)
        .unwrap();
    let qcow2 = dir.path().join("general.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", qcow2.to_str().unwrap(), "1G"],
    );
    let machine = dir.path().join("pc.toml");
    std::fs::write(&machine, "[guest.general]\nvcpus = 1\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "flash",
            image.to_str().unwrap(),
            target.to_str().unwrap(),
            "--guest",
        ])
        .arg(format!("general={}", qcow2.display()))
        .args(["--machine", machine.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = ok(&output);
    assert!(
        stdout.contains(&format!("sha256 {want_sha} matches the image")),
        "{stdout}"
    );
    let table = check_table(&target);
    check_backup_gpt_at_end(&target, size);
    check_data_fs(&target, &table, &stdout);

    let part = |label_prefix: &str| {
        table
            .partitions
            .iter()
            .find(|p| p.label.starts_with(label_prefix))
            .unwrap()
            .clone()
    };
    let root = part("root_");
    let root_mnt = dir.path().join("root");
    let _root = mount_partition(&target, &root, &root_mnt, "erofs");
    let passwd = std::fs::read_to_string(root_mnt.join("etc/passwd")).unwrap();
    let general_uid = airlock::flash::provision::passwd_ids(&passwd, "airlock-general")
        .expect("airlock-general in the image")
        .0;

    let mnt = dir.path().join("data");
    let _data = mount_data(&target, &table, &stdout, &mnt);
    let label = |rel: &str| {
        String::from_utf8(
            xattr::get(mnt.join(rel), "security.selinux")
                .unwrap()
                .expect("a label"),
        )
        .unwrap()
    };
    assert_eq!(label("lib/airlock"), context_of("/var/lib/airlock"));
    assert_eq!(
        label("lib/airlock/provision/appliance.toml"),
        context_of("/var/lib/airlock/provision(/.*)?")
    );
    assert_eq!(
        label("lib/airlock/general/disk/windows.qcow2"),
        context_of("/var/lib/airlock/general(/.*)?")
    );
    assert_eq!(
        label("lib/airlock/classified/disk"),
        context_of("/var/lib/airlock/classified(/.*)?")
    );
    let m = std::fs::metadata(mnt.join("lib/airlock/general/disk/windows.qcow2")).unwrap();
    assert_eq!(
        (m.uid(), m.permissions().mode() & 0o7777),
        (general_uid, 0o600)
    );
}

/// A signed bundle of 3 MiB of payload, made with `airlock sign`.
fn signed_bundle(fx: &Fixture) -> PathBuf {
    use airlock::bundle::{write_bundle, BundleInputs};
    let (root, verity, uki) = (fx.path("b-root"), fx.path("b-verity"), fx.path("b-uki"));
    std::fs::write(&root, vec![0xe0; 2 * MIB as usize]).unwrap();
    std::fs::write(&verity, vec![0x5a; MIB as usize]).unwrap();
    std::fs::write(&uki, b"MZ not really a UKI").unwrap();
    let bundle = fx.path("airlock_1.1.airlock");
    let inputs = BundleInputs {
        name: "airlock",
        version: "1.1",
        security_epoch: 0,
        compatible: "airlock-debian-x86_64".into(),
        build_id: None,
        root_hash: &"cd".repeat(32),
        root: &root,
        verity: &verity,
        uki: &uki,
    };
    write_bundle(&inputs, &bundle).unwrap();
    let unsigned = fx.flash_file(&bundle, &fx.target("unsigned-stick.raw", 8 * MIB), &[]);
    assert!(
        refused(&unsigned).contains("is not signed"),
        "an unsigned bundle made a stick"
    );
    let key = fx.path("it-key");
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "it",
            "-f",
            key.to_str().unwrap(),
        ],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .args([
            "sign",
            "--key",
            key.to_str().unwrap(),
            bundle.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "airlock sign: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bundle
}

#[test]
fn a_bundle_makes_an_update_stick_written_raw_and_read_back() {
    let fx = Fixture::new();
    let bundle = signed_bundle(&fx);
    let len = std::fs::metadata(&bundle).unwrap().len();
    // A used stick: old bytes everywhere.
    let backing = fx.target("stick.raw", 16 * MIB);
    let lo = LoopDev::attach(&[backing.to_str().unwrap()]);
    let dev = PathBuf::from(&lo.0);
    let stdout = ok(&fx.flash_file(&bundle, &dev, &[]));
    assert!(
        stdout.contains("writing update stick") && stdout.contains("airlock 1.1, 1 signature(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("matches the bundle")
            && stdout.contains("update stick with airlock 1.1 written and verified"),
        "{stdout}"
    );
    assert_eq!(
        sha256_range(&dev, 0, len),
        sha256(&bundle),
        "the stick does not start with the bundle"
    );
    drop(lo);
    // No provisioning on a stick; a target too small; a mounted one.
    let e = refused(&fx.flash_file(&bundle, &backing, &["--machine", bundle.to_str().unwrap()]));
    assert!(
        e.contains("is an update bundle") && e.contains("provisions nothing"),
        "{e}"
    );
    let small = fx.target("small-stick.raw", MIB);
    let e = refused(&fx.flash_file(&bundle, &small, &[]));
    assert!(e.contains("is too small"), "{e}");
    let before = sha256(&backing);
    let _lo = LoopDev::attach(&[backing.to_str().unwrap()]);
    let e = refused(&fx.flash_file(&bundle, &backing, &[]));
    assert!(e.contains("is in use"), "{e}");
    assert_eq!(sha256(&backing), before, "a refused stick was written");
}

/// Issue 11: what flash puts on /var reaches the disk only encrypted, and
/// the recovery key goes where IT says, never over another.
#[test]
fn var_reaches_the_disk_encrypted_and_the_recovery_key_only_where_it_was_asked() {
    let fx = Fixture::new();
    let (raw, qcow2) = guests(&fx);
    // A marker in the classified guest's disk, past its partition table.
    let marker = b"airlock-flash-test plain text marker 7f3a";
    let mut bytes = std::fs::read(&raw).unwrap();
    bytes[3 * MIB as usize..3 * MIB as usize + marker.len()].copy_from_slice(marker);
    std::fs::write(&raw, &bytes).unwrap();
    let machine = fx.path("pc.toml");
    std::fs::write(&machine, MACHINE).unwrap();
    let key_out = fx.path("pc-0042.recovery");
    let target = fx.target("pc.raw", 160 * MIB);
    let args = [
        "--guest".to_string(),
        format!("classified={}", raw.display()),
        "--guest".to_string(),
        format!("general={}", qcow2.display()),
        "--machine".to_string(),
        machine.display().to_string(),
        "--recovery-key-out".to_string(),
        key_out.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stdout = ok(&fx.flash(&target, &args));
    let key = std::fs::read_to_string(&key_out).unwrap();
    let key = key.trim();
    assert_eq!(
        std::fs::metadata(&key_out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        !stdout.contains(key) && !stdout.contains("RECOVERY KEY"),
        "the key was printed as well:\n{stdout}"
    );
    let disk = std::fs::read(&target).unwrap();
    assert!(
        !disk.windows(marker.len()).any(|w| w == marker),
        "the marker is on the target in plain text"
    );
    assert!(
        !disk.windows(key.len()).any(|w| w == key.as_bytes()),
        "the recovery key is on the target"
    );
    // The key opens /var, and the guest's disk is there, byte for byte.
    let table = check_table(&target);
    let as_printed = format!("RECOVERY KEY for /var on it:\n\n    {key}\n");
    let mnt = fx.path("data");
    let _data = mount_data(&target, &table, &as_printed, &mnt);
    let placed = std::fs::read(mnt.join("lib/airlock/classified/disk/windows.img")).unwrap();
    assert!(placed == bytes, "the provisioned guest disk differs");
    drop(_data);

    // Asked again with the same file: refused before anything is written.
    let before = sha256(&target);
    let e = refused(&fx.flash(&target, &args));
    assert!(
        e.contains("--recovery-key-out") && e.contains("exists"),
        "{e}"
    );
    assert_eq!(sha256(&target), before, "the target changed");
    assert_eq!(std::fs::read_to_string(&key_out).unwrap().trim(), key);
}

/// /var is staged on the flashing host: too little room there (TMPDIR on a
/// 4 MiB tmpfs, a 6 MiB guest disk) is refused before the target is touched.
#[test]
fn too_little_room_to_stage_var_is_refused_before_anything_is_written() {
    let fx = Fixture::new();
    let (raw, qcow2) = guests(&fx);
    let machine = fx.path("m.toml");
    std::fs::write(&machine, MACHINE).unwrap();
    let target = fx.target("pc.raw", 160 * MIB);
    let before = sha256(&target);
    let small = fx.path("small-tmp");
    std::fs::create_dir(&small).unwrap();
    run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            small.to_str().unwrap(),
        ],
    );
    let _mounted = MountAt(small.clone());
    let out = Command::new(env!("CARGO_BIN_EXE_airlock"))
        .env("TMPDIR", &small)
        .args([
            "flash",
            fx.image.to_str().unwrap(),
            target.to_str().unwrap(),
            "--guest",
        ])
        .arg(format!("classified={}", raw.display()))
        .arg("--guest")
        .arg(format!("general={}", qcow2.display()))
        .args(["--machine", machine.to_str().unwrap()])
        .output()
        .unwrap();
    let e = refused(&out);
    assert!(
        e.contains("no room to stage /var on this host") && e.contains("TMPDIR"),
        "{e}"
    );
    assert_eq!(sha256(&target), before, "the target changed");
}
