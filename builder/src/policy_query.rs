//! Questions about a compiled policy (the `policy.NN` written next to an
//! image), answered by setools from the build's tools tree: the distro's
//! setools reads the distro's policy version, which the host's may not.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::exec::Runner;
use crate::rootfs::{self, Cache};

const SCRIPT: &str = include_str!("policy_query.py");

/// May `source` use `permission` of class `class` on `target`?
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Access {
    pub source: String,
    pub target: String,
    pub class: String,
    pub permission: String,
}

impl Access {
    pub fn new(source: &str, target: &str, class: &str, permission: &str) -> Self {
        Access {
            source: source.into(),
            target: target.into(),
            class: class.into(),
            permission: permission.into(),
        }
    }
}

/// What setools said.
#[derive(Debug, Clone, Deserialize)]
pub struct Answers {
    /// One per question, in order: true when some allow rule grants it.
    pub access: Vec<bool>,
    /// Every type of the policy.
    pub types: Vec<String>,
}

/// The tools tree a manifest's builds use (it must exist: build first).
pub fn tools_tree(source: &Path, manifest_path: &Path, cache: &Path) -> Result<PathBuf> {
    let manifest = crate::manifest::load_manifest(manifest_path)?;
    let sets = rootfs::load_package_sets(&source.join("rootfs"), &manifest)?;
    let cache = Cache {
        root: cache.to_path_buf(),
    };
    let tree = cache
        .trees(&rootfs::tree_key(&manifest, &sets))
        .join("tools");
    ensure!(
        tree.join("usr").is_dir(),
        "no tools tree at {} (build the image first)",
        tree.display()
    );
    Ok(tree)
}

/// Asks setools, in `tools_tree`, about the binary policy `policy_file`.
pub fn ask(tools_tree: &Path, policy_file: &Path, questions: &[Access]) -> Result<Answers> {
    let work = tempfile::tempdir().context("making a scratch directory")?;
    let name = policy_file.file_name().context("policy file has no name")?;
    std::fs::copy(policy_file, work.path().join(name))
        .with_context(|| format!("copying {}", policy_file.display()))?;
    std::fs::write(work.path().join("query.py"), SCRIPT)?;
    let access: Vec<[&str; 4]> = questions
        .iter()
        .map(|q| {
            [
                q.source.as_str(),
                q.target.as_str(),
                q.class.as_str(),
                q.permission.as_str(),
            ]
        })
        .collect();
    let request =
        serde_json::json!({ "policy": Path::new("/run/airlock").join(name), "access": access });
    std::fs::write(work.path().join("request.json"), request.to_string())?;
    let runner = Runner::new(false)?;
    let out = runner.in_tree(
        "asking setools about the policy",
        tools_tree,
        work.path(),
        [
            "sh",
            "-c",
            "python3 /run/airlock/query.py < /run/airlock/request.json",
        ],
    )?;
    let answers: Answers =
        serde_json::from_str(&out).with_context(|| format!("setools printed {out:?}"))?;
    ensure!(
        answers.access.len() == questions.len(),
        "setools answered {} of {} questions",
        answers.access.len(),
        questions.len()
    );
    Ok(answers)
}
