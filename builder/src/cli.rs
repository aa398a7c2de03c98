//! Command-line interface: one struct per subcommand; doc comments become `--help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::build::Profile;

/// Default package and tree cache (documented in the README).
pub const DEFAULT_CACHE: &str = "/var/cache/airlock";

/// airlock: build, inspect and boot immutable two-domain appliance images.
#[derive(Debug, Parser)]
#[command(name = "airlock", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Build(BuildArgs),
    Inspect(InspectArgs),
    Qemu(QemuArgs),
    Flash(FlashArgs),
    Doctor,
    Genkeys(GenkeysArgs),
    Sign(SignArgs),
    Verify(VerifyArgs),
    #[command(subcommand)]
    Bundle(BundleCommand),
}

/// Add a signature to an update bundle (`<name>_<version>.airlock`).
///
/// With --key, signs with an unencrypted OpenSSH ed25519 private key.
/// For a passphrase-protected, FIDO2 (ed25519-sk) or agent key, sign the
/// manifest with OpenSSH and import the signature:
///
///   airlock bundle manifest B.airlock > B.manifest
///   ssh-keygen -Y sign -n airlock-update@v1 -f KEY B.manifest
///   airlock sign --signature B.manifest.sig B.airlock
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
#[command(group(clap::ArgGroup::new("signer").required(true).args(["key", "signature"])))]
pub struct SignArgs {
    /// OpenSSH private key file (unencrypted ed25519).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// A signature made by `ssh-keygen -Y sign -n airlock-update@v1` over
    /// the bundle's manifest bytes.
    #[arg(long)]
    pub signature: Option<PathBuf>,
    pub bundle: PathBuf,
}

/// Check an update bundle: framing, signatures and threshold, every
/// artifact's size and sha256. Exit 0 when valid; otherwise non-zero and
/// the reason.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Trusted keys: an OpenSSH allowed_signers file
    /// (`identity ssh-ed25519 AAAA…` per line), or a directory of `.pub` files.
    #[arg(long)]
    pub keys: PathBuf,
    /// How many distinct trusted keys must have signed.
    #[arg(long, default_value_t = 1)]
    pub threshold: usize,
    pub bundle: PathBuf,
}

/// Look inside an update bundle.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Write the manifest's exact bytes (what signatures cover) to stdout.
    Manifest { bundle: PathBuf },
}

/// Build a disk image from a TOML manifest.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The manifest (see examples/debian.toml).
    #[arg(long)]
    pub manifest: PathBuf,
    /// Where the image, its update bundle, its report, SHA256SUMS and its
    /// SELinux policy go.
    #[arg(long)]
    pub output: PathBuf,
    /// Package and tree cache, reused across builds.
    #[arg(long, default_value = DEFAULT_CACHE)]
    pub cache_dir: PathBuf,
    /// production (what ships) or test (adds the in-guest test agent).
    #[arg(long, value_enum, default_value = "production")]
    pub profile: Profile,
    /// The airlock source tree (overlay/, policy/, rootfs/).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.."))]
    pub source: PathBuf,
    /// Bootstrap the root tree afresh instead of reusing the cached one
    /// (downloaded packages are still reused).
    #[arg(long)]
    pub fresh: bool,
    /// Do nothing if the output already holds an image built from the same inputs.
    #[arg(long)]
    pub reuse: bool,
    /// A further overlay directory laid over the image after `overlay/`
    /// (site-specific files); may be given several times.
    #[arg(long = "extra-overlay")]
    pub extra_overlays: Vec<PathBuf>,
    /// A further directory of SELinux modules (`.te`/`.fc`/`.if`) installed
    /// after `policy/`; may be given several times. Its rules must satisfy
    /// the neverallow rules of `policy/`, or the build fails.
    #[arg(long = "extra-policy")]
    pub extra_policy_dirs: Vec<PathBuf>,
    /// Sign systemd-boot and the UKI for Secure Boot with this db private
    /// key (PEM, unencrypted; `airlock genkeys --secure-boot` makes one).
    /// Without it the boot files are unsigned and a PC with Secure Boot on
    /// refuses them.
    #[arg(long, requires = "secure_boot_cert", value_name = "DB_KEY")]
    pub secure_boot_key: Option<PathBuf>,
    /// The db certificate (PEM) of --secure-boot-key.
    #[arg(long, requires = "secure_boot_key", value_name = "DB_CERT")]
    pub secure_boot_cert: Option<PathBuf>,
    /// Sign the UKI's PCR 11 policy for each boot phase with this private
    /// key (PEM, unencrypted; `airlock genkeys --secure-boot` writes
    /// tpm2-pcr-private-key.pem): secrets sealed to it in a PC's TPM unseal
    /// under every image signed with it, and under no other.
    #[arg(long, value_name = "KEY")]
    pub tpm_policy_key: Option<PathBuf>,
    /// Print every command and its output.
    #[arg(long, short)]
    pub verbose: bool,
}

/// Make signing keys IT keeps. With --secure-boot: the UEFI Secure Boot
/// key pairs PK, KEK and db (`.key` private, `.crt` PEM and `.cer` DER
/// certificates), an owner GUID, and the TPM PCR policy key pair
/// (tpm2-pcr-{private,public}-key.pem). Refuses to overwrite any key.
///
/// Enrol db.cer, KEK.cer and PK.cer in each PC's firmware setup (PK last);
/// sign builds with `airlock build --secure-boot-key DIR/db.key
/// --secure-boot-cert DIR/db.crt`. Keep PK.key and KEK.key offline.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct GenkeysArgs {
    /// Make the Secure Boot keys (the only kind so far: update-signing keys
    /// are OpenSSH keys, `ssh-keygen -t ed25519`).
    #[arg(long, required = true)]
    pub secure_boot: bool,
    /// Directory for the keys (made 0700; must not hold keys already).
    #[arg(long)]
    pub output: PathBuf,
    /// Name in the certificates' subjects (`CN=<name> Secure Boot db`).
    #[arg(long, default_value = "airlock")]
    pub name: String,
}

/// Write an image onto a disk or an image file, and provision the machine.
///
/// Refuses, without override: a target in use (a partition mounted, swap,
/// a device-mapper/md holder, a loop device over an image file), the disk
/// this host runs from, a partition instead of a whole disk, a target
/// smaller than the image. Writes with progress, syncs, reads back and
/// compares sha256; on a larger target moves the backup GPT to the end and
/// grows the data partition (and its ext4) to fill the disk. Slot B stays
/// `_empty`. Every provisioning input is checked before anything is written.
///
///   airlock flash out/airlock_1.0.raw /dev/sdb \
///       --guest classified=win-classified.qcow2 --guest general=win-general.qcow2 \
///       --machine pc-0042.toml [--wireguard-key pc-0042.key]
///
/// Given a signed update bundle instead, writes it raw onto a USB stick
/// (same refusals, read-back): an update stick, which a PC's update agent
/// applies when it is plugged in.
///
///   airlock flash out/airlock_1.1.airlock /dev/sdc
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct FlashArgs {
    /// The built disk image (`<name>_<version>.raw`), or a signed update
    /// bundle (`<name>_<version>.airlock`) to make an update stick.
    pub image: PathBuf,
    /// A whole disk (/dev/sdX, /dev/nvmeXnY) or an existing image file
    /// (taken as a disk of its size).
    pub target: PathBuf,
    /// A guest's disk image, SIDE=FILE (side classified or general; raw or
    /// qcow2, detected by content). Needs --machine.
    #[arg(long = "guest", value_name = "SIDE=FILE", value_parser = crate::flash::provision::parse_guest_arg)]
    pub guests: Vec<(crate::flash::Side, PathBuf)>,
    /// The machine's settings: the provisioning layer of the appliance
    /// configuration, written to /var/lib/airlock/provision/appliance.toml
    /// after validation against the image's shipped configuration.
    #[arg(long, value_name = "FILE")]
    pub machine: Option<PathBuf>,
    /// This PC's WireGuard private key (one line, as `wg genkey` writes it),
    /// required when the image's configuration has a tunnel
    /// ([network.classified.wireguard]) and refused otherwise; written to
    /// /var/lib/airlock/provision/wg-classified.key (0600, readable by the
    /// network set-up only). Its public key is printed for the tunnel
    /// server. Needs --machine (the tunnel address is per PC).
    #[arg(long, value_name = "FILE")]
    pub wireguard_key: Option<PathBuf>,
    /// Write the data partition's recovery key to this new file (0600)
    /// instead of printing it. It is never stored on the PC; it unlocks
    /// /var when the PC's TPM will not (a moved disk, a new mainboard).
    #[arg(long, value_name = "FILE")]
    pub recovery_key_out: Option<PathBuf>,
    /// Print every command and its output.
    #[arg(long, short)]
    pub verbose: bool,
}

/// Describe a built disk image: partitions, root hash, command line, distro.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    pub image: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Boot a disk image under QEMU with OVMF (KVM when it works, TCG otherwise).
#[derive(Debug, clap::Args)]
pub struct QemuArgs {
    pub image: PathBuf,
    /// Discard every write to the image.
    #[arg(long)]
    pub snapshot: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Boot with Secure Boot on and the keys of this directory (`airlock
    /// genkeys --secure-boot`) enrolled, as on a PC set up by IT.
    #[arg(long, value_name = "DIR")]
    pub secure_boot_keys: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_needs_manifest_and_output() {
        assert!(Cli::try_parse_from(["airlock", "build", "--output", "o"]).is_err());
        let cli = Cli::try_parse_from([
            "airlock",
            "build",
            "--manifest",
            "m.toml",
            "--output",
            "o",
            "--profile",
            "test",
        ])
        .unwrap();
        match cli.command {
            Command::Build(b) => {
                assert_eq!(b.profile, Profile::Test);
                assert_eq!(b.cache_dir, PathBuf::from(DEFAULT_CACHE));
                assert!(!b.fresh && !b.reuse);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn inspect_and_qemu_take_an_image() {
        assert!(Cli::try_parse_from(["airlock", "inspect", "a.raw", "--json"]).is_ok());
        assert!(Cli::try_parse_from(["airlock", "qemu", "a.raw", "--snapshot"]).is_ok());
        assert!(Cli::try_parse_from(["airlock", "qemu"]).is_err());
    }

    #[test]
    fn flash_takes_image_target_guests_and_machine() {
        let cli = Cli::try_parse_from([
            "airlock",
            "flash",
            "a.raw",
            "/dev/sdb",
            "--guest",
            "classified=c.qcow2",
            "--guest",
            "general=g.raw",
            "--machine",
            "m.toml",
        ])
        .unwrap();
        match cli.command {
            Command::Flash(f) => {
                assert_eq!(f.target, PathBuf::from("/dev/sdb"));
                assert_eq!(f.guests.len(), 2);
                assert_eq!(
                    f.guests[1],
                    (crate::flash::Side::General, PathBuf::from("g.raw"))
                );
                assert_eq!(f.machine, Some(PathBuf::from("m.toml")));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["airlock", "flash", "a.raw"]).is_err());
        assert!(
            Cli::try_parse_from(["airlock", "flash", "a.raw", "t", "--guest", "secret=x"]).is_err()
        );
    }

    #[test]
    fn sign_needs_exactly_one_signer() {
        assert!(Cli::try_parse_from(["airlock", "sign", "b.airlock"]).is_err());
        assert!(Cli::try_parse_from([
            "airlock",
            "sign",
            "--key",
            "k",
            "--signature",
            "s",
            "b.airlock"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["airlock", "sign", "--signature", "s", "b.airlock"]).is_ok());
    }

    #[test]
    fn verify_defaults_to_one_signature() {
        match Cli::try_parse_from([
            "airlock",
            "verify",
            "--keys",
            "allowed_signers",
            "b.airlock",
        ])
        .unwrap()
        .command
        {
            Command::Verify(v) => assert_eq!(v.threshold, 1),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["airlock", "verify", "b.airlock"]).is_err());
        assert!(Cli::try_parse_from(["airlock", "bundle", "manifest", "b.airlock"]).is_ok());
    }
}
