//! Per-stage progress and timings.
//!
//! On a terminal each stage gets an indicatif spinner with its elapsed time;
//! otherwise (CI, logs) one plain line when a stage starts and one when it
//! ends. Timings are kept for the build report.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

/// How long one stage took.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
}

/// Runs named stages, reporting progress and recording timings.
pub struct Stages {
    interactive: bool,
    timings: Vec<StageTiming>,
    started: Instant,
}

impl Stages {
    pub fn new() -> Self {
        Stages {
            interactive: std::io::stdout().is_terminal(),
            timings: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Runs `f` as stage `name`: `detail` is shown beside the name.
    pub fn run<T>(&mut self, name: &str, detail: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let spinner = if self.interactive {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("{spinner} {prefix:>8} {msg} [{elapsed}]")
                    .expect("static template"),
            );
            pb.set_prefix(name.to_string());
            pb.set_message(detail.to_string());
            pb.enable_steady_tick(Duration::from_millis(120));
            Some(pb)
        } else {
            println!("airlock: stage {name}: {detail}");
            None
        };
        let result = f();
        let took = start.elapsed();
        self.timings.push(StageTiming {
            stage: name.to_string(),
            seconds: round_ms(took),
        });
        let outcome = if result.is_ok() { "done" } else { "FAILED" };
        match spinner {
            Some(pb) => pb.finish_with_message(format!(
                "{detail} — {outcome} in {:.1}s",
                took.as_secs_f64()
            )),
            None => println!(
                "airlock: stage {name}: {outcome} in {:.1}s",
                took.as_secs_f64()
            ),
        }
        result
    }

    pub fn timings(&self) -> &[StageTiming] {
        &self.timings
    }

    pub fn total(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Default for Stages {
    fn default() -> Self {
        Self::new()
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
