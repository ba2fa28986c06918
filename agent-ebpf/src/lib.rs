//! Library half of the CortexFlow kernel crate: helpers shared by the programs in `main.rs`.
#![no_std]
