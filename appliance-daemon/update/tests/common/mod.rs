//! A file-backed appliance for the agent's integration tests: a GPT disk
//! image made by sfdisk with the builder's layout (slot A holding image
//! 1.0, slot B `_empty`), a temp dir as the ESP, os-release, kernel command
//! line and state directory; real bundles signed by `ssh-keygen -Y sign`.
//! Needs `sfdisk` and `ssh-keygen` (ci/install-host-deps.sh installs both);
//! fails, never skips, without them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use airlock_bundle::format::RawHeader;
use airlock_bundle::{Artifact, ArtifactKind, Manifest, Version, NAMESPACE};
use sha2::{Digest, Sha256};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const ROOT_TYPE: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
pub const VERITY_TYPE: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";
/// Partition sizes (MiB) of the test disk: ESP, root, verity, root, verity, data.
const SIZES: [u64; 6] = [1, 2, 1, 2, 1, 1];

pub fn root_hash_for(version: &str) -> String {
    hex::encode(Sha256::digest(format!("root hash of {version}")))
}

pub fn uuids(root_hash: &str) -> (String, String) {
    let b = hex::decode(root_hash).unwrap();
    let u = |s: &[u8]| uuid_string(s);
    (u(&b[..16]), u(&b[16..]))
}

fn uuid_string(b: &[u8]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Bytes that differ per version and kind, so a wrong copy shows.
pub fn content(version: &str, kind: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut block = Sha256::digest(format!("{kind} {version}")).to_vec();
    while out.len() < len {
        out.extend_from_slice(&block);
        block = Sha256::digest(&block).to_vec();
    }
    out.truncate(len);
    out
}

pub struct Scene {
    pub dir: tempfile::TempDir,
    pub threshold: usize,
}

pub struct BundleSpec {
    pub version: String,
    pub epoch: u32,
    pub compatible: String,
    pub name: String,
    pub root_len: usize,
    pub verity_len: usize,
    pub uki_len: usize,
}

impl BundleSpec {
    pub fn new(version: &str) -> BundleSpec {
        BundleSpec {
            version: version.into(),
            epoch: 1,
            compatible: "airlock-debian-x86_64".into(),
            name: "airlock".into(),
            root_len: (1536 * KIB) as usize + 17,
            verity_len: (64 * KIB) as usize + 3,
            uki_len: (300 * KIB) as usize,
        }
    }
}

/// What the user would compare: the disk's bytes and mtime, the ESP's files.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub disk_sha256: String,
    pub disk_mtime: std::time::SystemTime,
    pub esp: BTreeMap<String, String>,
}

impl Scene {
    pub fn new() -> Scene {
        let s = Scene {
            dir: tempfile::tempdir().unwrap(),
            threshold: 1,
        };
        for key in ["alice", "bob", "mallory"] {
            let k = s.path(key);
            ok(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"])
                .arg(&k));
        }
        let allowed: String = ["alice", "bob"]
            .iter()
            .map(|k| {
                format!(
                    "{k}@example.org {}\n",
                    std::fs::read_to_string(s.path(&format!("{k}.pub")))
                        .unwrap()
                        .trim()
                )
            })
            .collect();
        std::fs::write(s.path("allowed_signers"), allowed).unwrap();
        s.make_disk();
        std::fs::create_dir_all(s.path("esp/EFI/Linux")).unwrap();
        std::fs::write(
            s.path("esp/EFI/Linux/airlock_1.0.efi"),
            content("1.0", "uki", 4096),
        )
        .unwrap();
        s.boot("1.0", 1);
        s
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The disk: builder layout, slot A = image 1.0 (its bytes written), slot B `_empty`.
    fn make_disk(&self) {
        let disk = self.path("disk.img");
        let total: u64 = SIZES.iter().sum::<u64>() * MIB + 2 * MIB;
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(total)
            .unwrap();
        let (ra, va) = uuids(&root_hash_for("1.0"));
        let types = [
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
            ROOT_TYPE,
            VERITY_TYPE,
            ROOT_TYPE,
            VERITY_TYPE,
            "4d21b016-b534-45c2-a9fb-5c16e091fd2d",
        ];
        let labels = [
            "esp",
            "root_airlock_1.0",
            "verity_airlock_1.0",
            "_empty",
            "_empty",
            "data",
        ];
        let mut script = String::from("label: gpt\nunit: sectors\n");
        let mut start = MIB / 512;
        for i in 0..6 {
            let uuid = match i {
                1 => format!(", uuid={ra}"),
                2 => format!(", uuid={va}"),
                _ => String::new(),
            };
            script.push_str(&format!(
                "start={start}, size={}, type={}{uuid}, name=\"{}\"\n",
                SIZES[i] * MIB / 512,
                types[i],
                labels[i]
            ));
            start += SIZES[i] * MIB / 512;
        }
        let mut child = Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&disk)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk (util-linux) must be installed");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(
            &content("1.0", "root", 2 * MIB as usize),
            self.partition("disk.img", 2).0,
        )
        .unwrap();
        f.write_all_at(
            &content("1.0", "verity", MIB as usize),
            self.partition("disk.img", 3).0,
        )
        .unwrap();
    }

    /// Pretends the machine runs `version` (os-release and roothash=).
    pub fn boot(&self, version: &str, epoch: u32) {
        std::fs::write(
            self.path("os-release"),
            format!("ID=debian\nIMAGE_ID=airlock\nIMAGE_VERSION={version}\nAIRLOCK_COMPATIBLE=airlock-debian-x86_64\nAIRLOCK_SECURITY_EPOCH={epoch}\n"),
        )
        .unwrap();
        std::fs::write(
            self.path("cmdline"),
            format!(
                "initrd=x roothash={} ro security=selinux enforcing=1\n",
                root_hash_for(version)
            ),
        )
        .unwrap();
    }

    /// (offset, size) in bytes of partition `n`, from sfdisk.
    pub fn partition(&self, disk: &str, n: u32) -> (u64, u64) {
        let p = &self.table(disk)[n as usize - 1];
        (
            p["start"].as_u64().unwrap() * 512,
            p["size"].as_u64().unwrap() * 512,
        )
    }

    pub fn table(&self, disk: &str) -> Vec<serde_json::Value> {
        let out = ok(Command::new("sfdisk").arg("--json").arg(self.path(disk)));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["partitiontable"]["partitions"]
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn label_and_uuid(&self, n: u32) -> (String, String) {
        let p = &self.table("disk.img")[n as usize - 1];
        (
            p["name"].as_str().unwrap_or("").to_string(),
            p["uuid"].as_str().unwrap().to_ascii_lowercase(),
        )
    }

    /// sha256 of `len` bytes at the start of partition `n`.
    pub fn partition_sha256(&self, n: u32, len: u64) -> String {
        let (off, size) = self.partition("disk.img", n);
        assert!(len <= size);
        let bytes = std::fs::read(self.path("disk.img")).unwrap();
        hex::encode(Sha256::digest(&bytes[off as usize..(off + len) as usize]))
    }

    pub fn snapshot(&self) -> Snapshot {
        let disk = self.path("disk.img");
        let mut esp = BTreeMap::new();
        for e in walk(&self.path("esp")) {
            let rel = e
                .strip_prefix(self.path("esp"))
                .unwrap()
                .display()
                .to_string();
            esp.insert(rel, hex::encode(Sha256::digest(std::fs::read(&e).unwrap())));
        }
        Snapshot {
            disk_sha256: hex::encode(Sha256::digest(std::fs::read(&disk).unwrap())),
            disk_mtime: std::fs::metadata(&disk).unwrap().modified().unwrap(),
            esp,
        }
    }

    /// The manifest and payload of a bundle, unsigned.
    pub fn manifest(&self, spec: &BundleSpec) -> (Manifest, Vec<u8>) {
        let parts = [
            (
                ArtifactKind::Root,
                content(&spec.version, "root", spec.root_len),
            ),
            (
                ArtifactKind::Verity,
                content(&spec.version, "verity", spec.verity_len),
            ),
            (
                ArtifactKind::Uki,
                content(&spec.version, "uki", spec.uki_len),
            ),
        ];
        let artifacts = parts
            .iter()
            .map(|(kind, b)| Artifact {
                kind: *kind,
                size: b.len() as u64,
                sha256: hex::encode(Sha256::digest(b)),
            })
            .collect();
        let m = Manifest {
            name: spec.name.clone(),
            version: Version::parse(&spec.version).unwrap(),
            security_epoch: spec.epoch,
            compatible: spec.compatible.clone(),
            build_id: None,
            build_date: None,
            root_hash: root_hash_for(&spec.version),
            artifacts,
        };
        let payload = parts.into_iter().flat_map(|(_, b)| b).collect();
        (m, payload)
    }

    /// `ssh-keygen -Y sign` of manifest bytes with `key`.
    pub fn sign(&self, manifest: &[u8], key: &str) -> Vec<u8> {
        let file = self.path(&format!("manifest-{key}"));
        std::fs::write(&file, manifest).unwrap();
        let sig = file.with_extension("sig");
        let _ = std::fs::remove_file(&sig);
        ok(Command::new("ssh-keygen")
            .args(["-q", "-Y", "sign", "-n", NAMESPACE, "-f"])
            .arg(self.path(key))
            .arg(&file));
        std::fs::read(&sig).unwrap()
    }

    /// A signed bundle file `<name>`.
    pub fn bundle(&self, file: &str, spec: &BundleSpec, keys: &[&str]) -> PathBuf {
        let (m, payload) = self.manifest(spec);
        let bytes = m.to_json();
        let signatures = keys.iter().map(|k| self.sign(&bytes, k)).collect();
        let mut out = RawHeader {
            manifest: bytes,
            signatures,
        }
        .encode()
        .unwrap();
        out.extend_from_slice(&payload);
        let path = self.path(file);
        std::fs::write(&path, out).unwrap();
        path
    }

    /// The agent with this scene's paths.
    pub fn agent(&self) -> Command {
        self.agent_on(&self.path("disk.img"))
    }

    /// The agent with this scene's paths and another disk.
    pub fn agent_on(&self, disk: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_airlock-update"));
        c.arg("--allowed-signers").arg(self.path("allowed_signers"));
        c.arg("--threshold").arg(self.threshold.to_string());
        c.arg("--disk").arg(disk);
        c.arg("--esp").arg(self.path("esp"));
        c.arg("--state-dir").arg(self.path("state"));
        c.arg("--os-release").arg(self.path("os-release"));
        c.arg("--cmdline").arg(self.path("cmdline"));
        c.arg("--control-socket").arg(self.path("control.sock"));
        c
    }

    pub fn apply(&self, bundle: &Path, extra: &[&str]) -> Output {
        run(self
            .agent()
            .arg("apply")
            .arg("--file")
            .arg(bundle)
            .args(extra))
    }
}

pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

pub fn ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
