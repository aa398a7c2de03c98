//! The checks that need the running system, as one pure function: is this
//! (already verified) bundle for this system, newer than what runs, not
//! below the stored security epoch, and does it fit the slots?

use crate::manifest::{ArtifactKind, Manifest, Version};

/// What the update agent knows about the system it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningSystem {
    /// The running image's compatible string (same form as the manifest's).
    pub compatible: String,
    /// The running image's version (`IMAGE_VERSION` of os-release).
    pub version: Version,
    /// The security epoch stored on the data partition (raised only after
    /// a new slot was blessed).
    pub stored_epoch: u32,
    /// Sizes of the inactive root and verity partitions, when known.
    pub root_slot_bytes: Option<u64>,
    pub verity_slot_bytes: Option<u64>,
}

/// Why a validly signed bundle is not for this system.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    #[error("the bundle is for {bundle:?}, this system is {running:?}")]
    WrongCompatible { bundle: String, running: String },
    #[error("version {bundle} is not newer than the running {running} (downgrade or reinstall)")]
    NotNewer { bundle: Version, running: Version },
    #[error("security epoch {bundle} is below the stored {stored} (rollback to a release with known flaws)")]
    EpochBelow { bundle: u32, stored: u32 },
    #[error("artifact {artifact} has {size} bytes, its slot only {slot}")]
    DoesNotFit {
        artifact: ArtifactKind,
        size: u64,
        slot: u64,
    },
}

/// Checks a verified manifest against the running system (pure).
pub fn check_policy(manifest: &Manifest, running: &RunningSystem) -> Result<(), PolicyRefusal> {
    if manifest.compatible != running.compatible {
        return Err(PolicyRefusal::WrongCompatible {
            bundle: manifest.compatible.clone(),
            running: running.compatible.clone(),
        });
    }
    if manifest.version <= running.version {
        return Err(PolicyRefusal::NotNewer {
            bundle: manifest.version.clone(),
            running: running.version.clone(),
        });
    }
    if manifest.security_epoch < running.stored_epoch {
        return Err(PolicyRefusal::EpochBelow {
            bundle: manifest.security_epoch,
            stored: running.stored_epoch,
        });
    }
    for (kind, slot) in [
        (ArtifactKind::Root, running.root_slot_bytes),
        (ArtifactKind::Verity, running.verity_slot_bytes),
    ] {
        if let (Some(slot), Some(a)) = (slot, manifest.artifact(kind)) {
            if a.size > slot {
                return Err(PolicyRefusal::DoesNotFit {
                    artifact: kind,
                    size: a.size,
                    slot,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::sample;

    fn running() -> RunningSystem {
        RunningSystem {
            compatible: "airlock-debian-x86_64".into(),
            version: Version::parse("1.1").unwrap(),
            stored_epoch: 3,
            root_slot_bytes: Some(1 << 30),
            verity_slot_bytes: Some(1 << 26),
        }
    }

    #[test]
    fn newer_compatible_bundle_passes() {
        assert_eq!(check_policy(&sample(), &running()), Ok(()));
        let mut higher_epoch = sample();
        higher_epoch.security_epoch = 4;
        assert_eq!(check_policy(&higher_epoch, &running()), Ok(()));
    }

    #[test]
    fn downgrade_and_reinstall_are_refused() {
        for v in ["1.1", "1.1.0", "1.0.9", "0.99"] {
            let r = RunningSystem {
                version: Version::parse(v).unwrap(),
                ..running()
            };
            let mut m = sample();
            m.version = Version::parse("1.1").unwrap();
            assert!(
                matches!(check_policy(&m, &r), Err(PolicyRefusal::NotNewer { .. }))
                    == (v == "1.1" || v == "1.1.0"),
                "{v}"
            );
        }
        let r = RunningSystem {
            version: Version::parse("1.10").unwrap(),
            ..running()
        };
        assert!(matches!(
            check_policy(&sample(), &r),
            Err(PolicyRefusal::NotNewer { .. })
        ));
    }

    #[test]
    fn lower_epoch_is_refused() {
        let r = RunningSystem {
            stored_epoch: 4,
            ..running()
        };
        assert_eq!(
            check_policy(&sample(), &r),
            Err(PolicyRefusal::EpochBelow {
                bundle: 3,
                stored: 4
            })
        );
    }

    #[test]
    fn wrong_compatible_string_is_refused() {
        let r = RunningSystem {
            compatible: "airlock-fedora-x86_64".into(),
            ..running()
        };
        assert!(matches!(
            check_policy(&sample(), &r),
            Err(PolicyRefusal::WrongCompatible { .. })
        ));
    }

    #[test]
    fn artifact_larger_than_its_slot_is_refused() {
        let mut m = sample();
        m.artifacts[0].size = (1 << 30) + 1;
        assert!(matches!(
            check_policy(&m, &running()),
            Err(PolicyRefusal::DoesNotFit {
                artifact: ArtifactKind::Root,
                ..
            })
        ));
    }
}
