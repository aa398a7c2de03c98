//! See ../../README.md.
